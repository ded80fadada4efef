"""The jitted pieces of training: one optimizer step with gradient accumulation, and losses
for evaluation. All are pure functions of `(graphdef, params, ...)`; params is GPT's plain
parameter dict (what Orbax saves), merged into a model inside the traced function.

Shapes: A micro-batches per step (gradient accumulation), B rows each, T = block_size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nanogpt_jax.config import GPTConfig


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token loss (..., T) of float32 logits (..., T, V) against target ids (..., T)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepMetrics:
    loss: jax.Array  # () mean training loss over the step's A micro-batches
    grad_norm: jax.Array  # () global norm of the averaged gradient, before clipping


def make_train_step(optimizer: optax.GradientTransformation) -> Callable:
    """The jitted step for `optimizer`: (graphdef, params, opt_state, batch, key) ->
    (params, opt_state, StepMetrics). params and opt_state are donated: they are replaced."""

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
    def train_step(graphdef, params, opt_state, batch, key):
        inputs, targets = batch  # 2 x (A, B, T) int32

        def micro_loss(params, x, y, micro_key):
            model = nnx.merge(graphdef, params)
            logits, _ = model(x, rngs=nnx.Rngs(dropout=micro_key))  # (B, T, V) float32
            return cross_entropy(logits, y).mean()

        def accumulate(grad_sum, micro):
            x, y, index = micro
            # dropout stream: the iteration's key, folded with the micro-step
            loss, grads = jax.value_and_grad(micro_loss)(
                params, x, y, jax.random.fold_in(key, index)
            )
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        micro_steps = inputs.shape[0]
        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, losses = jax.lax.scan(
            accumulate, zeros, (inputs, targets, jnp.arange(micro_steps))
        )
        grads = jax.tree.map(lambda g: g / micro_steps, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, StepMetrics(losses.mean(), optax.global_norm(grads))

    return train_step


@functools.partial(jax.jit, static_argnums=0)
def summed_window_loss(graphdef, params, inputs, targets, weights) -> jax.Array:
    """Sum over windows of weight * (mean token loss of the window), without dropout.

    inputs, targets: (N, B, T) int32, scanned over N so memory holds one batch at a time;
    weights: (N, B) float32, 0 for padding windows.
    """
    model = nnx.merge(graphdef, params)

    def add_batch(total, batch):
        x, y, w = batch
        logits, _ = model(x)  # (B, T, V)
        return total + jnp.sum(w * cross_entropy(logits, y).mean(axis=-1)), None

    total, _ = jax.lax.scan(add_batch, jnp.zeros((), jnp.float32), (inputs, targets, weights))
    return total


def mean_loss(graphdef, params, inputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean loss of (N, B, T) batches of windows."""
    weights = np.ones(inputs.shape[:2], np.float32)
    return float(summed_window_loss(graphdef, params, inputs, targets, weights)) / weights.size


def windowed_loss(graphdef, params, inputs: np.ndarray, targets: np.ndarray, batch_size=32):
    """Mean loss of (W, T) windows, evaluated batch_size at a time. The last batch is padded
    with zero-weight windows so every batch has one shape (one compile)."""
    count = len(inputs)
    batches = -(-count // batch_size)
    pad = batches * batch_size - count

    def batched(a):  # (W, T) -> (batches, batch_size, T)
        return np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]).reshape(
            batches, batch_size, -1
        )

    weights = (np.arange(batches * batch_size) < count).astype(np.float32)
    weights = weights.reshape(batches, batch_size)
    total = summed_window_loss(graphdef, params, batched(inputs), batched(targets), weights)
    return float(total) / count


# Peak dense bfloat16 FLOP/s per chip, matched against jax's device_kind. nanoGPT assumes an
# A100's 312 TFLOP/s; MFU is reported against the bfloat16 peak whatever the compute dtype.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card peaks at 756e12 (pass --peak_flops)
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def known_peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def flops_per_token(config: GPTConfig, num_params: int) -> float:
    """nanoGPT's estimate_mfu (PaLM appendix B): 6N for the weights' forward and backward
    matmuls, plus 12 L H Q T for attention. N excludes the position embedding, as nanoGPT's
    get_num_params does."""
    n = num_params - config.block_size * config.n_embd
    L, H, Q, T = config.n_layer, config.n_head, config.head_dim, config.block_size
    return 6 * n + 12 * L * H * Q * T
