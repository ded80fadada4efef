"""nanoGPT's sampling algorithm on this project's model: no KV cache; every new token runs the
whole (cropped) context through the model again.

A benchmark baseline that holds the weights, jit and XLA's fusion equal, so that comparing it
with the cached engine measures the algorithm alone; it draws with the engine's sampler.

Buffer: the context sits right-aligned against the next free slot, behind PAD empty slots, so
that a window of any width ending at the newest token is a plain slice.

    slot:   0 ... PAD-1 | PAD ... PAD+P-1 | PAD+P ...
            empty       | prompt          | new tokens ->

Step t (context length L = P + t) takes the last W slots before the next free one, where W is
the smallest power of two >= L (at least 16, at most block_size, at most P + N - 1): a handful of
widths, one compiled loop each. Empty slots inside the window are masked out of attention and
real tokens get positions 0..L-1, so each step computes exactly nanoGPT's forward pass over
`idx[:, -block_size:]`, padded to W tokens; summed over a run that is about 1.3x nanoGPT's
token-forwards (a single fixed width would be about 2x). Once L exceeds block_size the window
slides with positions 0..block_size-1, nanoGPT's crop. As in nanoGPT's inference forward, the
lm_head runs on the last position only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nanogpt_jax.sampling import SamplingParams, next_power_of_two, sample

MIN_WIDTH = 16


def window_plan(prompt_len: int, num_new: int, block_size: int) -> list[tuple[int, int, int]]:
    """(first step, end step, window width) for runs of steps that share a width."""
    plan = []
    for t in range(num_new):
        context = prompt_len + t
        width = min(
            max(MIN_WIDTH, next_power_of_two(context)),
            block_size,
            max(prompt_len + num_new - 1, 1),
        )
        if plan and plan[-1][2] == width:
            plan[-1] = (plan[-1][0], t + 1, width)
        else:
            plan.append((t, t + 1, width))
    return plan


@functools.partial(jax.jit, static_argnums=0, static_argnames=("num_new", "vocab_size"))
def generate_nocache(
    graphdef, params, prompt, sampling: SamplingParams, seed, *, num_new: int, vocab_size: int
):
    """Continuation (B, num_new) of prompts (B, P), recomputing the context each step.

    sampling: greedy or a draw (the engine's sampler); row b's key at step t is
    fold_in(fold_in(key(seed), b), t). vocab_size: ids of a padded embedding at or beyond it
    are never chosen.
    """
    model = nnx.merge(graphdef, params)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.key(seed), jnp.arange(prompt.shape[0])
    )
    B, P = prompt.shape
    plan = window_plan(P, num_new, model.config.block_size)
    pad = max(width for _, _, width in plan)
    tokens = jnp.zeros((B, pad + P + num_new), jnp.int32)  # (B, pad + P + N)
    tokens = jax.lax.dynamic_update_slice(tokens, prompt.astype(jnp.int32), (0, pad))

    for first, end, width in plan:

        def step(t, tokens, width=width):
            context = P + t  # tokens so far
            window = jax.lax.dynamic_slice_in_dim(tokens, pad + context - width, width, axis=1)
            start = jnp.full((B,), jnp.maximum(width - context, 0))  # first real slot
            positions = jnp.maximum(jnp.arange(width)[None, :] - start[:, None], 0)  # (B, W)
            logits, _ = model(window, positions, start=start, last_only=True)  # (B, 1, V)
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
            token = sample(logits[:, -1, :vocab_size], keys, sampling)  # (B,)
            return jax.lax.dynamic_update_slice(tokens, token[:, None], (0, pad + context))

        tokens = jax.lax.fori_loop(first, end, step, tokens)
    return tokens[:, pad + P :]
