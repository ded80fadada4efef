"""The native decode-step attention against float64 numpy, each row independent of the other
rows and of the cache's size, and when it is used."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax.kernels.decode_attention import applies, attend_filled


def exact_attention(q, k, v, lengths):
    """The masked softmax in float64: q (R, 1, D), k and v (R, S, D), lengths (R,)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = np.einsum("rtd,rsd->rts", q, k) / math.sqrt(q.shape[-1])
    visible = np.arange(k.shape[1])[None, None, :] < np.asarray(lengths)[:, None, None]
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("rts,rsd->rtd", weights, v)


def random_cache(seed, R, S, D, spare_rows=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (R, 1, D))
    k = jax.random.normal(keys[1], (R + spare_rows, S, D))
    v = jax.random.normal(keys[2], (R + spare_rows, S, D))
    return q, k, v


@pytest.mark.parametrize("D", [64, 16, 72, 5])
def test_attention_is_float32_accurate(D):
    """Rows of 1 to S slots, head widths that are and are not multiples of the vector (and of
    8 vectors), a cache holding more rows than the queries: within 1e-6 of float64."""
    S = 130
    lengths = jnp.array([1, 2, 3, 4, 5, 63, 64, 65, 129, 130])
    q, k, v = random_cache(D, len(lengths), S, D, spare_rows=3)
    got = np.asarray(jax.jit(attend_filled)(q, k, v, lengths))
    expected = exact_attention(q, k[: len(lengths)], v[: len(lengths)], lengths)
    assert got.shape == (len(lengths), 1, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # not vacuous: a row that saw one slot more gets another answer
    assert np.abs(np.asarray(attend_filled(q, k[:10], v[:10], lengths + 1)) - got).max() > 1e-3


def test_scores_far_apart_and_all_alike():
    """Queries scaled so that a row's scores span far more than float32's e^-87 (their
    smallest weights underflow to 0), scores that are all equal (every weight 1: the mean of
    the values), and lengths that are not whole vectors: within 1e-6 of float64."""
    R, S, D = 4, 77, 64
    q, k, v = random_cache(5, R, S, D)
    q = q * jnp.array([60.0, 25.0, 1.0, 0.0])[:, None, None]
    lengths = jnp.array([77, 41, 9, 13])
    got = np.asarray(attend_filled(q, k, v, lengths))
    np.testing.assert_allclose(got, exact_attention(q, k, v, lengths), rtol=0, atol=1e-6)
    scores = np.einsum("rd,rsd->rs", np.asarray(q)[:, 0], np.asarray(k)) / math.sqrt(D)
    assert np.ptp(scores[0, :77]) > 87  # the first row's weights do underflow
    np.testing.assert_allclose(got[3, 0], np.asarray(v)[3, :13].mean(0), rtol=0, atol=1e-6)


def test_a_rows_result_depends_on_its_own_slots_only():
    """The same bits beside other rows of other lengths, alone, and in a larger cache whose
    extra slots hold other numbers; slots past a row's length are never read (NaN there)."""
    R, S, D = 12, 96, 64
    q, k, v = random_cache(0, R, S, D)
    lengths = jnp.arange(1, R + 1) * 8
    together = np.asarray(attend_filled(q, k, v, lengths))
    for r in range(R):
        alone = attend_filled(q[r : r + 1], k[r : r + 1], v[r : r + 1], lengths[r : r + 1])
        np.testing.assert_array_equal(np.asarray(alone)[0], together[r])
    past = jnp.arange(S)[None, :, None] >= lengths[:, None, None]
    unread = [jnp.where(past, jnp.nan, t) for t in (k, v)]
    np.testing.assert_array_equal(np.asarray(attend_filled(q, *unread, lengths)), together)
    bigger = [jnp.concatenate([t, jnp.full((R, 64, D), 7.0)], axis=1) for t in (k, v)]
    np.testing.assert_array_equal(np.asarray(attend_filled(q, *bigger, lengths)), together)
    reversed_rows = attend_filled(q[::-1], k[::-1], v[::-1], lengths[::-1])
    np.testing.assert_array_equal(np.asarray(reversed_rows), together[::-1])


def test_a_bfloat16_cache_gives_the_float32_caches_bits():
    """A cache of bfloat16 numbers, given as bfloat16, as its bits (uint16, the engine's CPU
    cache) or widened to float32: the same bits each way, within 1e-6 of float64, for head
    widths that are and are not whole vectors."""
    for D in (64, 5):
        lengths = jnp.array([1, 7, 8, 9, 64, 100])
        q, k, v = random_cache(D + 1, len(lengths), 100, D, spare_rows=2)
        half = [t.astype(jnp.bfloat16) for t in (k, v)]
        bits = [jax.lax.bitcast_convert_type(t, jnp.uint16) for t in half]
        widened = [t.astype(jnp.float32) for t in half]
        expected = np.asarray(attend_filled(q, *widened, lengths))
        np.testing.assert_array_equal(np.asarray(attend_filled(q, *half, lengths)), expected)
        np.testing.assert_array_equal(np.asarray(attend_filled(q, *bits, lengths)), expected)
        cut = [t[: len(lengths)] for t in widened]
        np.testing.assert_allclose(expected, exact_attention(q, *cut, lengths), rtol=0, atol=1e-6)
        # not vacuous: the float32 cache's own numbers give another answer
        assert np.abs(np.asarray(attend_filled(q, k, v, lengths)) - expected).max() > 1e-4


def test_the_kernel_takes_a_decode_steps_folded_cache_only(monkeypatch):
    q, cache = jnp.zeros((24, 1, 64)), jnp.zeros((24, 128, 64))
    assert applies(q, cache, cache)
    assert applies(q.astype(jnp.bfloat16), cache, cache)  # the query is taken as float32
    assert not applies(jnp.zeros((24, 2, 64)), cache, cache)  # two queries a row: a prefill
    assert not applies(q.reshape(2, 12, 1, 64), *[cache.reshape(2, 12, 128, 64)] * 2)  # heads
    half = cache.astype(jnp.bfloat16)
    assert applies(q, half, half)
    bits = jax.lax.bitcast_convert_type(half, jnp.uint16)
    assert applies(q, bits, bits)
    assert not applies(q, half, cache)  # k and v in one dtype
    other = cache.astype(jnp.float16)
    assert not applies(q, other, other)
    monkeypatch.setenv("NANOGPT_JAX_KERNELS", "0")
    assert not applies(q, cache, cache)
