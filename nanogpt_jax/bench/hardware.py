"""The hardware floor of a decode step, from rates measured in the same run.

A decode step must at least read every weight once (the whole batch shares the read) plus
the keys and values of the context, and do 2 FLOPs per multiply-add; it cannot finish before
the slower of the two: bytes / read bandwidth or FLOPs / matmul rate. Both rates are
measured with JAX on the device the benchmark runs on, so the floor is one this machine,
through XLA, has shown it can reach.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp

from nanogpt_jax.config import GPTConfig
from nanogpt_jax.kernels import rows_times

REPEATS = 5


def call_seconds(function, *args, repeats: int = REPEATS) -> list[float]:
    """Seconds of each of `repeats` timed calls, after one call that compiles."""
    jax.block_until_ready(function(*args))
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - began)
    return times


def best_seconds(function, *args) -> float:
    """Fastest of a few timed calls, after one call that compiles."""
    return min(call_seconds(function, *args))


def memory_bandwidth(num_bytes: int) -> dict:
    """GB/s read (the fastest of the programs at hand that read the same bytes once) and of an
    in-place elementwise update (bytes read + written, for reference).

    A decode step reads its weights and cache and writes almost nothing, so its floor is the
    read rate. The programs: XLA's sum and matrix-vector product, and on a CPU the engine's own
    products kernel at one row, so that the floor reads at least as fast as the engine's step
    can (a Zen 4, minutes apart: sum 32-34 GB/s, matrix-vector and kernel 34-37 alike, the
    kernel over gpt2's weights 35-44). The update counts both directions and can exceed any
    read-only program (a 2-core Zen 3: update 30-40 GB/s; sum 22-24, matrix-vector 28, a C++
    AVX2 read loop 25-26)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    vector = jnp.ones((1024,), jnp.float32)
    reads = {
        "sum": best_seconds(jax.jit(jnp.sum), x),
        "matvec": best_seconds(jax.jit(lambda a, v: a.reshape(-1, 1024) @ v), x, vector),
    }
    if x.devices().pop().platform == "cpu" and rows_times.built():
        product = jax.jit(lambda a, v: rows_times.rows_times(v[None], a.reshape(-1, 1024)))
        reads["kernel"] = best_seconds(product, x, vector)
    # donated, so the update writes where it reads: no fresh output pages to fault in
    scale = jax.jit(lambda a: a * 0.5, donate_argnums=0)
    x = jax.block_until_ready(scale(x))
    times = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        x = jax.block_until_ready(scale(x))
        times.append(time.perf_counter() - began)
    return {
        "copy_gbs": 2 * num_bytes / min(times) / 1e9,
        "read_gbs": num_bytes / min(reads.values()) / 1e9,
        **{f"read_{name}_gbs": num_bytes / seconds / 1e9 for name, seconds in reads.items()},
    }


def matmul_rate(n: int, dtype) -> float:
    """TFLOP/s of an (n, n) x (n, n) matrix product in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    return 2 * n**3 / best_seconds(jax.jit(jnp.matmul), a, b) / 1e12


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_hardware(dtype: str) -> dict:
    """Device description and its measured bandwidth and matmul rate (in `dtype`)."""
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    tflops = matmul_rate(2048 if on_cpu else 8192, jnp.dtype(dtype))  # big enough for the peak
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        **bandwidth_now(),
        "matmul_tflops": tflops,
        "matmul_dtype": dtype,
        "jax": jax.__version__,
    }


def bandwidth_now() -> dict:
    """`memory_bandwidth` of arrays well past the caches, and the read rate a floor uses
    (bandwidth_gbs). A machine that shares its memory with neighbours reads 30-46 GB/s from one
    minute to the next (a 2-core Zen 4), so a benchmark measures it again next to each cell."""
    on_cpu = jax.devices()[0].platform == "cpu"
    bandwidth = memory_bandwidth((256 if on_cpu else 2048) * 2**20)
    return bandwidth | {"bandwidth_gbs": bandwidth["read_gbs"]}


def decode_step_cost(config: GPTConfig, weight_bytes: int, batch: int, context: float, itemsize):
    """(bytes, FLOPs) a KV-cached decode step needs at least, for `context` tokens of history.

    weight_bytes: the matrices and vectors read once per step (wpe is left out: a step reads
    one row of it).
    """
    C, L = config.n_embd, config.n_layer
    matmul_params = L * 12 * C * C + config.vocab_size * C  # per layer: qkv 3C², proj C², mlp 8C²
    kv_bytes = 2 * L * batch * context * C * itemsize
    flops = 2 * batch * matmul_params + 2 * 2 * L * batch * context * C  # + q·k and att·v
    return weight_bytes + kv_bytes, flops


def floor_seconds(cost: tuple[float, float], hardware: dict) -> float:
    num_bytes, flops = cost
    return max(
        num_bytes / (hardware["bandwidth_gbs"] * 1e9), flops / (hardware["matmul_tflops"] * 1e12)
    )
