"""AdamW as nanoGPT configures it: weight decay on matrices and embeddings only, global-norm
gradient clipping, and linear warmup into a cosine decay of the learning rate."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from nanogpt_jax.training.config import TrainConfig

ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which nanoGPT keeps


def learning_rate_schedule(config: TrainConfig) -> Callable[[jax.Array | int], jax.Array]:
    """nanoGPT's get_lr(it) as a function of the step count, usable inside jit."""
    peak, floor = config.learning_rate, config.min_lr
    warmup, decay_end = config.warmup_iters, config.lr_decay_iters

    def lr_at(step):
        if not config.decay_lr:
            return jnp.float32(peak)
        step = jnp.asarray(step, jnp.float32)
        warming = peak * (step + 1) / (warmup + 1)
        # decay_ratio runs 0 -> 1 between warmup and lr_decay_iters; coefficient 1 -> 0
        ratio = jnp.clip((step - warmup) / max(decay_end - warmup, 1), 0.0, 1.0)
        cosine = floor + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (peak - floor)
        return jnp.where(step < warmup, warming, jnp.where(step > decay_end, floor, cosine))

    return lr_at


def decays(params) -> dict:
    """Which parameters are decayed: the >= 2-D ones (matmul weights, embeddings), not biases
    or LayerNorm gains, as nanoGPT's configure_optimizers groups them."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clip, then AdamW. The state has the same structure whether or not clipping is on, so a
    run can be resumed with a different grad_clip."""
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.beta1,
        b2=config.beta2,
        eps=ADAM_EPS,
        weight_decay=config.weight_decay,
        mask=decays,
    )
    return optax.chain(clip, adamw)
