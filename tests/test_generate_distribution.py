"""generate()'s sampling options, end to end: what `bundle.generate` draws follows the
filtered softmax of the model's own logits, filters that keep one token are greedy, and every
step and every row draws from its own key."""

import jax
import numpy as np
import pytest
from conftest import distinct_new
from flax import nnx
from reference_sampling import assert_matches, expected_distribution

import nanogpt_jax
from nanogpt_jax.bundle import make_bundle
from nanogpt_jax.checkpoint import params_of
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.model import GPT
from nanogpt_jax.tokenizer import CharTokenizer

ROWS = 5000
PROMPTS = ["ROMEO:", "KING:", "O"]


@pytest.fixture(scope="module")
def char_bundle(char_checkpoint):
    return nanogpt_jax.load(char_checkpoint)


@pytest.mark.parametrize(
    "filters", [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6)], ids=["top_k", "min_p", "top_p"]
)
def test_filters_that_keep_one_token_are_greedy(char_bundle, filters):
    greedy = char_bundle.generate(PROMPTS, max_new_tokens=40, temperature=0.0)
    assert all(
        distinct_new(row, n) > 10
        for row, n in zip(greedy.tokens, greedy.prompt_lengths, strict=True)
    )
    kept_one = char_bundle.generate(PROMPTS, max_new_tokens=40, temperature=1.0, seed=3, **filters)
    assert kept_one.texts == greedy.texts
    # the control: the same draw without the filter is not greedy
    free = char_bundle.generate(PROMPTS, max_new_tokens=40, temperature=1.0, seed=3)
    assert free.texts != greedy.texts


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.5, top_p=0.7),
        dict(temperature=1.2, min_p=0.1),
        dict(temperature=0.9, top_k=12, top_p=0.9, min_p=0.02),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_first_new_token_follows_the_filtered_softmax(char_bundle, options):
    """The first token of 5,000 samples against the model's logits filtered by the reference
    definitions (chi-square, p = 1e-4): the options reach the sampler, all of them."""
    prompt = char_bundle.tokenizer.encode("ROMEO:")
    logits = np.asarray(char_bundle.logits([prompt]))[0, -1, : char_bundle.tokenizer.vocab_size]
    expected = expected_distribution(logits, **options)
    result = char_bundle.generate([prompt] * ROWS, max_new_tokens=1, seed=21, **options)
    first = result.tokens[:, len(prompt)]
    counts = np.bincount(first, minlength=len(expected))
    assert counts.sum() == ROWS and (expected > 0).sum() > 2  # a real choice was made
    assert_matches(counts, expected)


@pytest.fixture(scope="module")
def uniform_bundle(shakespeare_chars):
    """A model whose logits are all zero: each draw is uniform over the 65 symbols."""
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16)
    params = jax.tree.map(np.array, params_of(GPT(config, rngs=nnx.Rngs(0))))
    params["ln_f"]["scale"][:] = 0.0
    params["ln_f"]["bias"][:] = 0.0
    return make_bundle(config, CharTokenizer(shakespeare_chars), params)


def pair_counts(a: np.ndarray, b: np.ndarray, vocab: int) -> np.ndarray:
    return np.bincount((a * vocab + b).ravel(), minlength=vocab * vocab)


def test_consecutive_tokens_and_rows_are_independent(uniform_bundle):
    """Steps and rows each draw from their own key: with uniform logits, a token says nothing
    about the next one (past block_size too, where the window is recomputed) nor about the
    token of the next row. A key that ignored the step would repeat one token per row."""
    rows, steps, vocab = 1000, 48, 65
    assert np.all(np.asarray(uniform_bundle.logits([[1, 2, 3]])) == 0.0)
    result = uniform_bundle.generate([[0]] * rows, max_new_tokens=steps, temperature=1.0, seed=8)
    tokens = result.tokens[:, 1:]  # (rows, steps)
    assert tokens.shape == (rows, steps)
    uniform = np.full(vocab, 1 / vocab)
    assert_matches(np.bincount(tokens.ravel(), minlength=vocab), uniform)
    pairs = np.full(vocab * vocab, 1 / vocab**2)
    assert_matches(pair_counts(tokens[:, :-1], tokens[:, 1:], vocab), pairs)  # step to step
    assert_matches(pair_counts(tokens[:-1], tokens[1:], vocab), pairs)  # row to row
