"""The native few-rows product against float64 numpy, its rows independent of each other, when
it is used, and what happens when it cannot be built."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax.kernels import decode_attention, kth_largest, native
from nanogpt_jax.kernels import rows_times as kernel
from nanogpt_jax.kernels.rows_times import MAX_ROWS, applies, rows_times

SHAPES = [(1, 768, 2304), (2, 8, 1), (3, 100, 37), (5, 3072, 768), (8, 64, 512), (16, 13, 5)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("R, K, N", SHAPES)
def test_the_product_is_float32_accurate(dtype, R, K, N):
    """Within the float32 error bound of a K-term sum (K * eps * sum |x w|) of the exact
    product, for widths that are and are not a multiple of the vector length."""
    rng = np.random.default_rng(R * K + N)
    x = jnp.asarray(rng.normal(size=(R, K)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.normal(size=(N, K)), jnp.float32).astype(dtype)
    got = np.asarray(jax.jit(rows_times)(x, w))
    xs, ws = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact = xs @ ws.T
    bound = K * np.finfo(np.float32).eps * (np.abs(xs) @ np.abs(ws).T)
    assert got.shape == (R, N) and got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= bound)
    assert np.abs(got - exact).max() < 1e-3 * np.abs(exact).max()  # not vacuous


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    """Row r of a product of R rows is the same bits for every R from r+1 to 16: a seeded
    request decodes the same text alone or beside others."""
    rng = np.random.default_rng(0)
    for K, N in [(256, 1000), (100, 77)]:
        x = jnp.asarray(rng.normal(size=(16, K)), jnp.float32).astype(dtype)
        w = jnp.asarray(rng.normal(size=(N, K)), jnp.float32).astype(dtype)
        full = np.asarray(jax.jit(rows_times)(x, w))
        for R in range(1, 16):
            np.testing.assert_array_equal(np.asarray(jax.jit(rows_times)(x[:R], w)), full[:R])
        shuffled = np.asarray(jax.jit(rows_times)(x[::-1], w))
        np.testing.assert_array_equal(shuffled, full[::-1])


def test_bfloat16_rows_against_float32_weights_are_widened_exactly():
    """bfloat16 rows with float32 weights: the same bits as the rows widened beforehand."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 300)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(50, 300)), jnp.float32)
    widened = np.asarray(rows_times(x.astype(jnp.float32), w))
    np.testing.assert_array_equal(np.asarray(rows_times(x, w)), widened)
    assert np.abs(widened).max() > 1  # not vacuous


def test_a_call_returns_only_when_every_threads_tasks_are_done():
    """Five tasks of about a millisecond each (8 rows against a 63 MB weight) on two threads:
    one thread takes the fifth while the other waits, awake and then asleep, and the op after
    the call reads the result only when all five are done. Fresh rows every call, so a stale
    result cannot pass for one."""
    rng = np.random.default_rng(2)
    K, N = 131072, 120
    w = jnp.asarray(rng.normal(size=(N, K)), jnp.float32)
    ws = np.asarray(w, np.float64)
    product = jax.jit(lambda x, w: -rows_times(x, w))  # read as soon as the call returns
    for _ in range(8):
        x = jnp.asarray(rng.normal(size=(8, K)), jnp.float32)
        xs = np.asarray(x, np.float64)
        bound = K * np.finfo(np.float32).eps * (np.abs(xs) @ np.abs(ws).T)
        assert np.all(np.abs(np.asarray(product(x, w)) + xs @ ws.T) <= bound)


def test_the_kernel_takes_a_decode_steps_few_rows_only(monkeypatch):
    f32, bf16 = jnp.zeros((8, 4), jnp.float32), jnp.zeros((8, 4), jnp.bfloat16)

    def step(rows, tokens=1):
        return jnp.zeros((rows, tokens, 4), jnp.float32)

    assert applies(step(2), f32) and applies(step(MAX_ROWS), f32)
    assert applies(step(1), bf16) and applies(step(MAX_ROWS), bf16)
    assert applies(step(1), f32) == native.cpu_has("avx512vl")  # where measured faster
    monkeypatch.setattr(kernel, "takes_a_lone_float32_row", lambda: False)
    assert not applies(step(1), f32) and applies(step(1), bf16)
    monkeypatch.setattr(kernel, "takes_a_lone_float32_row", lambda: True)
    assert applies(step(1), f32)
    assert not applies(step(MAX_ROWS + 1), f32) and not applies(step(MAX_ROWS + 1), bf16)
    assert not applies(step(2, tokens=2), f32)  # a prefill
    assert not applies(jnp.zeros((4, 4)), f32)
    assert not applies(step(2), jnp.zeros((8, 4), jnp.float16))
    monkeypatch.setenv("NANOGPT_JAX_KERNELS", "0")
    assert not applies(step(2), f32)


def test_off_a_cpu_no_kernel_is_built_or_used(monkeypatch):
    """On a GPU or TPU backend every kernel says it is unavailable without building anything:
    they are CPU programs, registered for the CPU platform only."""

    def no_build(name, symbol):
        raise AssertionError(f"{name} built off a CPU")

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(native, "register", no_build)
    assert not decode_attention.available() and not kth_largest.available()
    assert not applies(jnp.zeros((8, 1, 4), jnp.float32), jnp.zeros((8, 4), jnp.float32))


def test_without_a_compiler_the_model_falls_back_to_xla(tmp_path):
    """CXX names a compiler that fails: a one-line note for each kernel, no kernel, and the model's
    products and attention go to XLA (in a fresh process, with an empty cache directory)."""
    code = (
        "import jax.numpy as jnp\n"
        "from nanogpt_jax.kernels import decode_attention, native\n"
        "from nanogpt_jax.kernels.rows_times import applies\n"
        "assert not applies(jnp.zeros((2, 1, 8)), jnp.zeros((4, 8)))\n"
        "assert not native.register('rows_times', 'RowsTimes')\n"
        "cache = jnp.zeros((4, 16, 8))\n"
        "assert not decode_attention.applies(jnp.zeros((4, 1, 8)), cache, cache)\n"
        "print('fallback ok')\n"
    )
    env = {"CXX": "false", "NANOGPT_JAX_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
    for name in ("rows_times", "decode_attention"):
        notes = [line for line in result.stderr.splitlines() if f"{name} kernel" in line]
        assert len(notes) == 1 and "using XLA's operations" in notes[0]
    assert not list(tmp_path.rglob("*.so"))


def test_a_build_is_kept_and_reused(tmp_path, monkeypatch):
    """The first build writes one library under the cache directory; the next finds it."""
    monkeypatch.setenv("NANOGPT_JAX_HOME", str(tmp_path))
    built = native.build("rows_times")
    assert built is not None and built.parent == tmp_path / "kernels"
    stamp = built.stat().st_mtime_ns
    assert native.build("rows_times") == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]
