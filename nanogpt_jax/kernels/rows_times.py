"""A decode step's few rows times a weight matrix with the native kernel (`rows_times.cc`),
where it is faster than XLA:CPU's library products.

Measured on gpt2's 49 weight products (docs/benchmarks.md): from 2 to 16 rows in float32 and
from 1 to 16 in bfloat16 the kernel is faster, and a lone float32 row too on a CPU with
AVX-512, where the kernel asks for weights 16 KB ahead (a Zen 4: the engine's batch-1 float32
step 12-20% faster than in XLA's own one-row product; on a Zen 3 with AVX2, XLA's was faster);
past 16 rows XLA's library products win. A prefill (many tokens a row) stays with XLA, so a
prompt's keys, values and logits do not depend on how it is batched.
The kernel sums each row in an order of its own that does not depend on the other rows, so a
row's logits are the same bits in every decode batch of up to MAX_ROWS rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanogpt_jax.kernels import native

MAX_ROWS = 16
NAME, SYMBOL = "rows_times", "RowsTimes"  # the FFI target, and its handler in the library


def built() -> bool:
    """Whether the kernel is built and registered in this process (NANOGPT_JAX_KERNELS aside)."""
    return native.register(NAME, SYMBOL)


def takes_a_lone_float32_row() -> bool:
    """Whether a float32 decode step of one row goes to the kernel: where it was measured
    faster than XLA's one-row product (AVX-512, as the kernel's 16 KB prefetch)."""
    return native.cpu_has("avx512vl")


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether x (B, 1, in) times w goes to the kernel: one token a row (a decode step) on a
    CPU, 2 to MAX_ROWS rows (1 in bfloat16, or with AVX-512), a float32 or bfloat16 weight,
    and a kernel built for this machine."""
    fewest = 1 if w.dtype == jnp.bfloat16 or takes_a_lone_float32_row() else 2
    return (
        x.ndim == 3
        and x.shape[1] == 1
        and fewest <= x.shape[0] <= MAX_ROWS
        and w.dtype in (jnp.float32, jnp.bfloat16)
        and native.available(NAME, SYMBOL)
    )


def rows_times(rows: jax.Array, w: jax.Array) -> jax.Array:
    """rows (R, K) times w (*out, K) -> (R, *out) in float32. Every product of two bfloat16
    numbers is exact in float32, so only the order of the float32 sums differs from XLA's.
    bfloat16 rows go in as they are: against bfloat16 weights on a CPU with AVX512-BF16 the
    kernel takes them two numbers at a time (its pair products); elsewhere it widens them."""
    if not built():
        raise RuntimeError("the rows_times kernel could not be built for this machine")
    weight = w.reshape(-1, w.shape[-1])
    if rows.dtype != jnp.bfloat16:
        rows = rows.astype(jnp.float32)
    out = jax.ShapeDtypeStruct((rows.shape[0], weight.shape[0]), jnp.float32)
    y = jax.ffi.ffi_call(NAME, out, vmap_method="sequential")(rows, weight)
    return y.reshape(rows.shape[:1] + w.shape[:-1])
