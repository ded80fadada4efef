"""Each row's k-th largest logit with the native kernel (`kth_largest.cc`): the cut of top-k
sampling, on a CPU.

Inside a decode loop XLA:CPU's top-k either sorts every row of a batch or, taken a row at a
time, pays the loop's overhead for each (`sampling.top_k`); the kernel selects every row in
one call, its rows split over the threads. It is a selection, no arithmetic: the cut is the
row's own number, the one `sampling.kth_largest` bisects for, so the filter keeps the same
tokens either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanogpt_jax.kernels import native

NAME, SYMBOL = "kth_largest", "KthLargest"  # the FFI target, its handler


def built() -> bool:
    """Whether the kernel is built and registered in this process (NANOGPT_JAX_KERNELS aside)."""
    return native.register(NAME, SYMBOL)


def available() -> bool:
    """Whether the kernel may be used here: on a CPU, enabled and built."""
    return native.available(NAME, SYMBOL)


def kth_largest(x: jax.Array, k: jax.Array) -> jax.Array:
    """x (..., V), k (...) -> (...): each row's k-th largest value in float32, k clamped to
    [1, V], in the order of `sampling.ordered_bits` (-0 below +0, NaNs past the infinities)."""
    if not built():
        raise RuntimeError("the kth_largest kernel could not be built for this machine")
    out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    k = jnp.broadcast_to(k, x.shape[:-1]).astype(jnp.int32)
    return jax.ffi.ffi_call(NAME, out, vmap_method="broadcast_all")(x.astype(jnp.float32), k)
