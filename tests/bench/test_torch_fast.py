"""torch-fast, gpt-fast's decoding recipe on nanoGPT's model: its static cache computes
nanoGPT's logits, its greedy tokens are the engine's across the block_size crop, and its draws
keep to the top-k."""

import jax
import numpy as np
import pytest
import torch
from conftest import assert_logits_close, distinct_new, spread_model

from nanogpt_jax.bench.torch_fast import StaticCacheDecoder
from nanogpt_jax.bundle import make_bundle
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.interop.torch_reference import from_params
from nanogpt_jax.tokenizer import CharTokenizer

# 96 embedding rows, 65 of them a vocabulary: padded ids must never be drawn
CONFIG = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32)
VOCAB = 65


@pytest.fixture(scope="module")
def models():
    _, params = spread_model(CONFIG, seed=3)
    params = jax.tree.map(np.asarray, params)
    reference = from_params(CONFIG, params)
    # eager: the same code as the compiled step (tests/bench/test_bench.py runs that one
    # through the benchmark), without minutes of Inductor compiles
    return params, reference, StaticCacheDecoder(reference, "cpu", VOCAB, compile_options=None)


def test_the_static_cache_gives_nanogpts_logits(models):
    """Prefill and one-token steps through the preallocated buffers against nanoGPT's
    forward over the whole context, step by step (float32)."""
    _, reference, decoder = models
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, (2, 20)))
    P, steps = 5, 15
    with torch.inference_mode():
        decoder.setup_caches(2, P + steps)
        logits = decoder.forward(idx[:, :P], torch.arange(P))
        for t in range(steps + 1):
            expected = reference(idx[:, : P + t])[:, -1]
            assert_logits_close(logits.numpy(), expected.numpy())
            if t < steps:
                logits = decoder.forward(idx[:, P + t : P + t + 1], torch.tensor([P + t]))


def test_greedy_equals_the_engine_across_the_block_size_crop(models, shakespeare_chars):
    params, _, decoder = models
    bundle = make_bundle(CONFIG, CharTokenizer(shakespeare_chars), params)
    prompts = np.random.default_rng(1).integers(0, VOCAB, (3, 10))
    ours = bundle.generate(prompts, max_new_tokens=40, temperature=0.0).tokens[:, 10:]
    theirs = decoder.generate(prompts, 40)  # 10 + 40 > block_size 32: 9 steps cropped
    np.testing.assert_array_equal(theirs, ours)
    assert all(distinct_new(row, 0) > 10 for row in theirs)


def test_draws_keep_to_the_top_k(models):
    """The exponential race under top_k=3: the first token of 256 rows is always one of the
    three likeliest, and not always the same one; no padded id is ever drawn."""
    _, reference, decoder = models
    prompt = np.random.default_rng(2).integers(0, VOCAB, (1, 8))
    with torch.inference_mode():
        logits = reference(torch.from_numpy(prompt))[0, -1, :VOCAB]
    allowed = set(torch.topk(logits, 3).indices.tolist())
    torch.manual_seed(0)  # the race's exponentials come from torch's generator
    drawn = decoder.generate(np.repeat(prompt, 256, axis=0), 16, temperature=1.0, top_k=3)
    assert set(drawn[:, 0].tolist()) <= allowed and len(set(drawn[:, 0].tolist())) > 1
    assert drawn.min() >= 0 and drawn.max() < VOCAB  # past the first token too
