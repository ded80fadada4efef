"""The native k-th largest against numpy's sort and the two XLA ways of `apply_top_k`, and
the tokens a sampled decode draws with and without it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax import sampling
from nanogpt_jax.kernels.kth_largest import available, kth_largest


def numpy_kth_largest(x, k):
    """Row by row, numpy's descending sort at k - 1 (k clamped to [1, V])."""
    x = np.asarray(x)
    k = np.clip(np.asarray(k), 1, x.shape[-1])
    return np.array([np.sort(row)[::-1][kk - 1] for row, kk in zip(x, k, strict=True)])


def awkward_rows(seed, V):
    """Rows of logits as a model gives them, and rows that are mostly ties, infinities, signed
    zeros and numbers far apart: every bin of the kernel's count crowded or empty."""
    rng = np.random.default_rng(seed)
    rows = [
        rng.normal(0, 3, V),
        np.round(rng.normal(0, 1, V), 1),  # few distinct values: long runs of ties
        np.where(rng.random(V) < 0.5, -np.inf, rng.normal(0, 1, V)),
        np.where(rng.random(V) < 0.3, np.inf, rng.normal(0, 1, V)),
        rng.choice([-0.0, 0.0, 1.0, -1.0], V),
        np.full(V, 7.0),
        rng.normal(0, 1, V) * 10.0 ** rng.integers(-30, 30, V),
        np.linspace(-1e-38, 1e-38, V),  # below float32's normal numbers
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("V", [50257, 1000, 7, 1])
def test_the_kth_largest_is_numpys(V):
    """Every k from 1 to V (with V = 1000 and smaller) or a spread of them, on rows built to
    crowd or empty the kernel's bins, and k past V or below 1 (clamped): numpy's sorted row."""
    x = awkward_rows(V, V)
    ks = range(1, V + 1) if V <= 1000 else [1, 2, 199, 200, 256, 4097, V - 1, V, V + 5, 0, -3]
    for k in ks:
        k_rows = jnp.full((x.shape[0],), k, jnp.int32)
        got = np.asarray(kth_largest(jnp.asarray(x), k_rows))
        np.testing.assert_array_equal(got, numpy_kth_largest(x, k_rows))


def test_the_kth_largest_is_the_bisections_bits():
    """The kernel's cut is `sampling.kth_largest`'s to the bit (-0 and +0 apart), a k for each
    row, under jit and vmap."""
    x = jnp.asarray(awkward_rows(3, 4099))
    k = jnp.array([1, 5, 2049, 4099, 3000, 17, 4098, 2])
    expected = np.asarray(sampling.kth_largest(x, k)).view(np.uint32)
    np.testing.assert_array_equal(np.asarray(jax.jit(kth_largest)(x, k)).view(np.uint32), expected)
    stacked = jax.vmap(kth_largest)(jnp.stack([x, -x]), jnp.stack([k, k]))
    np.testing.assert_array_equal(np.asarray(stacked[0]).view(np.uint32), expected)
    negated = np.asarray(sampling.kth_largest(-x, k)).view(np.uint32)
    np.testing.assert_array_equal(np.asarray(stacked[1]).view(np.uint32), negated)


def test_the_near_selection_cuts_at_its_distances_exactly():
    """Keys 2^d - 1, 2^d and 2^d + 1 below a row's largest, for each distance 2^d the kernel
    counts within (and past the widest), each k-th largest at such a border: numpy's, with the
    largest positive, negative, and with a crowd of ties at the largest."""
    top = np.asarray(sampling.ordered_bits(jnp.float32(9.5))).item()
    offsets = np.unique([(1 << d) + e for d in range(17, 30) for e in (-1, 0, 1)])
    filler = np.full(5000, -1e30, np.float32)
    for largest in (top, top ^ 0xFFFFFFFF):  # 9.5's key, and a key below every positive one
        keys = np.concatenate([[largest], largest - offsets]).astype(np.uint32)
        row = np.asarray(sampling.float_of_ordered_bits(jnp.asarray(keys)))
        for ties in (0, 300):
            x = np.concatenate([row, np.full(ties, row[0], np.float32), filler])
            x = np.random.default_rng(ties).permutation(x)[None]
            for k in range(1, len(keys) + ties + 2):
                got = np.asarray(kth_largest(jnp.asarray(x), jnp.array([k], jnp.int32)))
                np.testing.assert_array_equal(got, numpy_kth_largest(x, [k]))


@pytest.mark.parametrize("top_k", [1, 40, 200, 513, 3000])
def test_top_k_keeps_the_same_tokens_with_and_without_the_kernel(top_k, monkeypatch):
    """`apply_top_k` with the kernel against XLA's way for that bucket (a sort up to 512, the
    bisection past it), with a different k a row and rows that keep everything (k 0)."""
    assert available()
    rows = awkward_rows(top_k, 5000)
    params = sampling.SamplingParams.create(top_k=top_k, vocab_size=5000).for_rows(len(rows))
    k = np.minimum(np.arange(len(rows)) * 97 % top_k + 1, top_k)
    k[2] = 0
    params = dataclasses.replace(params, top_k=jnp.asarray(k, jnp.int32))
    with_kernel = np.asarray(jax.jit(sampling.apply_top_k)(rows, params))
    monkeypatch.setenv("NANOGPT_JAX_KERNELS", "0")
    without = np.asarray(jax.jit(sampling.apply_top_k)(rows, params))
    np.testing.assert_array_equal(with_kernel, without)
    kept = np.isfinite(with_kernel) | (rows == np.inf)
    assert kept[2].sum() == np.isfinite(rows[2]).sum() + (rows[2] == np.inf).sum()  # k 0: all
    assert kept[0].sum() == k[0] and kept[5].all()  # distinct logits: k kept; all tied: all


def test_a_sampled_decode_draws_the_same_tokens_with_and_without_the_kernel(monkeypatch):
    """`sample` over a 48-step loop at nanoGPT's settings (temperature 0.8, top_k 200), 8 rows:
    the same tokens with the kernel as with XLA's row-by-row top-k."""
    V, B, steps = 50257, 8, 48
    params = sampling.SamplingParams.create(temperature=0.8, top_k=200, vocab_size=V)

    def run(logits, keys):
        def step(x, key):
            token = sampling.sample(x, jax.random.split(key, B), params)
            return jnp.roll(x, 7, axis=-1), token  # new logits each step

        return jax.lax.scan(step, logits, keys)[1]

    logits = jax.random.normal(jax.random.key(1), (B, V)) * 3
    keys = jax.random.split(jax.random.key(2), steps)
    with_kernel = np.asarray(jax.jit(run)(logits, keys))
    monkeypatch.setenv("NANOGPT_JAX_KERNELS", "0")
    without = np.asarray(jax.jit(run)(logits, keys))
    np.testing.assert_array_equal(with_kernel, without)
    assert len(np.unique(with_kernel)) > steps  # not vacuous: draws vary
