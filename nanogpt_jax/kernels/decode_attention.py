"""A decode step's attention with the native kernel (`decode_attention.cc`): each row's one
query against the filled slots of its cache, read where they lie.

XLA:CPU either reads every slot of the cache or copies each block of slots out of it before
multiplying (`model.attend_filled`); the kernel reads each row's own slots once for its scores
and once for its values (gpt2, batch 8: see docs/benchmarks.md). A row's result depends only
on its own query, slots and length, so it is the same bits in every batch and cache size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanogpt_jax.kernels import native

NAME, SYMBOL = "decode_attention", "DecodeAttention"  # the FFI target, its handler


def built() -> bool:
    """Whether the kernel is built and registered in this process (NANOGPT_JAX_KERNELS aside)."""
    return native.register(NAME, SYMBOL)


def available() -> bool:
    """Whether the kernel may be used here: on a CPU, enabled and built."""
    return native.available(NAME, SYMBOL)


def applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether q (R, 1, D) against a cache k, v (R', S, D) goes to the kernel: one query a
    row, heads folded into the rows, a float32 or bfloat16 cache (or bfloat16's bits, uint16),
    on a CPU, with a kernel built here."""
    return (
        q.ndim == 3
        and q.shape[1] == 1
        and k.ndim == 3
        and k.dtype == v.dtype
        and k.dtype in (jnp.float32, jnp.bfloat16, jnp.uint16)
        and available()
    )


def attend_filled(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """q (R, 1, D), k and v (R' >= R, S, D), lengths (R,): the slots each row may see ->
    (R, 1, D) in float32, the softmax of q's scaled scores over those slots times their
    values. A bfloat16 cache is widened exactly as it is read: the same numbers in float32
    give the same bits."""
    if not built():
        raise RuntimeError("the decode_attention kernel could not be built for this machine")
    R, _, D = q.shape
    out = jax.ShapeDtypeStruct((R, D), jnp.float32)
    query = q.reshape(R, D).astype(jnp.float32)
    y = jax.ffi.ffi_call(NAME, out, vmap_method="sequential")(
        query, k, v, lengths.astype(jnp.int32)
    )
    return y.reshape(R, 1, D)
