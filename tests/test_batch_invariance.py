"""A row's logits do not depend on the rows beside it or on the cache size, bit for bit:
what lets a server promise that a seeded request gives the same text alone or under load.
(On XLA:CPU this needs reductions kept out of the YNNPACK library, at least two rows per
product, and a decode step's products all in the native kernel, up to 16 rows; see "Batch
invariance" in nanogpt_jax.engine.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_logit_error, spread_model

from nanogpt_jax.bench.run import IdTokenizer
from nanogpt_jax.bundle import make_bundle
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.engine import FILL, engine_of
from nanogpt_jax.sampling import SamplingParams

# wide enough that a batch's layer norms and softmaxes are large reductions, which XLA:CPU
# would otherwise hand to a library that sums them in another order
CONFIG = GPTConfig(block_size=128, vocab_size=512, n_layer=2, n_head=4, n_embd=256)


@pytest.fixture(scope="module")
def bundle():
    _, params = spread_model(CONFIG, seed=1)
    return make_bundle(CONFIG, IdTokenizer(512), jax.device_get(params))


def logits_of_row_0(bundle, others: int, num_slots: int, window: int, steps: int = 8):
    """Row 0's logits before each of `steps` greedy steps, beside `others` random rows."""
    engine = engine_of(bundle)
    rng = np.random.default_rng(others + num_slots)
    rows = [list(range(7, 18))] + [
        rng.integers(0, 512, rng.integers(1, 16)).tolist() for _ in range(others)
    ]
    B = len(rows)
    tokens = np.zeros((B, 16), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    lengths = np.array([len(r) for r in rows], np.int32)
    sampling = SamplingParams.create(0.0).for_rows(B)
    max_new = np.full((B,), 100, np.int32)
    state = engine.start(tokens, lengths, 0, np.arange(B), sampling, max_new, num_slots, window)
    seen = [np.asarray(state.logits[0])]
    for _ in range(steps):
        state, _ = engine.decode(state, jnp.array([FILL]), 1)
        seen.append(np.asarray(state.logits[0]))
    return np.stack(seen)


def test_a_rows_logits_do_not_depend_on_its_batch_or_cache(bundle):
    reference = logits_of_row_0(bundle, others=1, num_slots=32, window=0)
    for others, num_slots, window in [(4, 32, 0), (15, 64, 0), (7, 128, 128), (1, 128, 128)]:
        np.testing.assert_array_equal(
            logits_of_row_0(bundle, others, num_slots, window),
            reference,
            err_msg=f"{others + 1} rows, {num_slots} cache slots",
        )


@pytest.mark.parametrize("bucket, group", [(16, 8), (32, 4), (64, 2), (128, 2)])
def test_a_prompt_prefilled_alone_gets_what_it_gets_beside_others(bundle, bucket, group):
    """A server prefills a long prompt alone and short ones of a bucket together: a prompt's
    keys, values and next-token logits are the same either way (a row per token in every
    product; the lm_head's two)."""
    engine = engine_of(bundle)
    rng = np.random.default_rng(bucket)
    n = bucket - 3
    prompt = rng.integers(0, 512, n)
    alone, together = np.zeros((1, bucket), np.int32), np.zeros((group, bucket), np.int32)
    alone[0, :n] = together[group - 1, :n] = prompt
    others = rng.integers(1, bucket + 1, group - 1)
    for row, length in enumerate(others):
        together[row, :length] = rng.integers(0, 512, length)
    one = engine.prefill(alone, np.array([n], np.int32))
    many = engine.prefill(together, np.array([*others, n], np.int32))
    np.testing.assert_array_equal(np.asarray(one.logits[0]), np.asarray(many.logits[-1]))
    H = CONFIG.n_head
    for mine, theirs in zip(one.k + one.v, many.k + many.v, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs)[-H:])


def test_a_lone_row_matches_a_batched_one(bundle):
    """Where the native kernel takes a lone float32 row (AVX-512), its logits are a 4-row
    batch's, bit for bit; elsewhere XLA's one-row product rounds differently, within 1e-5."""
    from nanogpt_jax.kernels.rows_times import takes_a_lone_float32_row

    alone = logits_of_row_0(bundle, others=0, num_slots=32, window=0)
    batched = logits_of_row_0(bundle, others=3, num_slots=32, window=0)
    if takes_a_lone_float32_row():
        np.testing.assert_array_equal(alone, batched)
    else:
        assert relative_logit_error(alone, batched) < 1e-5


def test_a_row_of_a_big_batch_is_close_to_one_of_a_small_batch(bundle):
    """Past MAX_ROWS rows a decode step's products go to XLA's library, not the native
    kernel: close to a small batch's logits, though not the same bits."""
    from nanogpt_jax.kernels.rows_times import MAX_ROWS

    small = logits_of_row_0(bundle, others=3, num_slots=32, window=0)
    big = logits_of_row_0(bundle, others=MAX_ROWS, num_slots=32, window=0)
    assert 0.0 < relative_logit_error(big, small) < 1e-5


def test_a_sample_is_the_same_whatever_else_is_drawn_beside_it(bundle):
    """Sampled at temperature 1 (every near-tie can flip a draw): sample i of a prompt is the
    same tokens in batches of 2 and 6 rows, with other prompts of its bucket beside it."""
    prompt = list(range(30, 42))
    others = [list(range(100 + 5 * i, 100 + 5 * i + 9 + i)) for i in range(4)]
    options = dict(max_new_tokens=60, temperature=1.0, seed=11)
    pair = bundle.generate([prompt, prompt], **options)
    crowd = bundle.generate([prompt, prompt, *others], **options)
    np.testing.assert_array_equal(crowd.tokens[:2, : pair.tokens.shape[1]], pair.tokens)
    assert len(set(pair.tokens[0, 12:].tolist())) > 10


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.9, top_k=5),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=1.3, min_p=0.2),
    ],
)
def test_a_row_inserted_into_a_running_state_draws_what_generate_draws(bundle, settings):
    """The server's path: a prompt prefilled beside another, inserted into slot 2 of four,
    its first token drawn on insertion. That token and the ones the decode calls draw after
    it are sample 1 of `generate` with the same seed."""
    prompt = list(range(30, 42))
    expected = bundle.generate([prompt, prompt], max_new_tokens=24, seed=5, **settings)
    expected = expected.tokens[1, len(prompt) : len(prompt) + 24].tolist()
    engine = engine_of(bundle)
    tokens = np.zeros((2, 16), np.int32)
    tokens[0, :12], tokens[1, :5] = prompt, prompt[:5]
    prefilled = engine.prefill(tokens, np.array([12, 5], np.int32))
    sampling = SamplingParams.create(**settings, vocab_size=512)
    state = engine.empty(4, 64, 0)
    state, first = engine.insert(state, prefilled, 0, 2, 5, 1, sampling, 24)
    state = dataclasses.replace(
        state,
        sampling=dataclasses.replace(
            state.sampling,
            top_k_bucket=sampling.top_k_bucket,
            use_top_p=sampling.use_top_p,
            greedy=False,
        ),
    )
    drawn = []
    for _ in range(4):
        state, out = engine.decode(state, jnp.array([FILL]), 8)
        drawn += [t for t in np.asarray(out.tokens[2]).tolist() if t != FILL]
    assert int(first) == drawn[0]
    assert drawn == expected
    assert np.all(np.asarray(state.done))


def test_decoding_the_first_rows_only_changes_no_token(bundle):
    """A server with few requests decodes its first slots only: rows in slots 0-2 of eight,
    sampled, past block_size (the window recompute), draw the same tokens and logits as
    when every slot is decoded, and the empty slots stay as they were."""
    engine = engine_of(bundle)
    assert engine.decodes_first_rows
    tokens = np.zeros((2, 16), np.int32)
    tokens[0, :12], tokens[1, :7] = range(30, 42), range(60, 67)
    lengths = np.array([12, 7], np.int32)
    settings = [dict(temperature=1.0), dict(temperature=0.9, top_k=5), dict(temperature=0.0)]

    def decoded(rows: int):
        prefilled = engine.prefill(tokens, lengths)
        state = engine.empty(8, CONFIG.block_size, CONFIG.block_size)
        for slot, options in enumerate(settings):
            sampling = SamplingParams.create(**options, vocab_size=512)
            state, _ = engine.insert(state, prefilled, slot % 2, slot, 3, slot, sampling, 150)
        sampling = dataclasses.replace(state.sampling, top_k_bucket=512)
        state = dataclasses.replace(state, sampling=sampling)
        drawn, logits = [], []
        for _ in range(10):  # 160 steps: rows of 12 and 7 tokens grow past block_size 128
            state, out = engine.decode(state, jnp.array([FILL]), 16, rows=rows)
            drawn.append(np.asarray(out.tokens))
            logits.append(np.asarray(state.logits))
        return np.concatenate(drawn, axis=1), np.stack(logits), state

    every_tokens, every_logits, _ = decoded(rows=0)
    first_tokens, first_logits, state = decoded(rows=4)
    np.testing.assert_array_equal(first_tokens, every_tokens)
    np.testing.assert_array_equal(first_logits[:, :3], every_logits[:, :3])
    assert (first_tokens[:3] != FILL).sum(axis=1).tolist() == [150, 150, 150]
    assert len(set(first_tokens[0].tolist())) > 20  # a sampled row that wanders
    assert np.all(first_tokens[3:] == FILL)
    # slots 4-7, outside the decoded rows, untouched (slot 3, inside, computes unread values)
    assert np.all(first_logits[:, 4:] == 0)
    assert np.asarray(state.cache.lengths)[4:].tolist() == [0] * 4
    assert np.all(np.asarray(state.cache.k[0])[4 * CONFIG.n_head :] == 0)
