"""The least a decode step's products take on this machine: a program of nothing else.

The hardware floor (`hardware.py`) assumes products that read at full bandwidth or multiply at
the large-matrix rate; a library's few-row products may do neither. The bound is what the
libraries at hand achieve on one decode step's own weight products (each layer's four and
the tied lm_head), chained so that none can be hoisted out of the loop, at the step's batch
size and dtype, once through the engine's own `rows_times` (XLA, or the native kernel where
the step uses it) and once through PyTorch (`F.linear`). No attention, norm, GELU, cache
write or draw: a step whose weights are multiplied at the rate of the faster library cannot
take less, so the bound over a step's `ms_per_token` says how much of it is those products.
(Attention is left out: its cost depends on how the cache is read, which is the engine's
choice, not a library's rate; see `attend_filled`.)
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogpt_jax.bench.hardware import call_seconds
from nanogpt_jax.model import rows_times

STEPS = 16  # steps per timed program: long enough that a call's overhead is noise


def step_weights(params) -> tuple[list[list[jax.Array]], jax.Array]:
    """Each layer's (c_attn, attn.c_proj, c_fc, mlp.c_proj) weights, (out, in), and the tied
    lm_head (wte), as the model stores them."""
    tree = nnx.to_pure_dict(params)
    layers = [
        [
            tree["h"][i]["attn"]["c_attn"]["weight"],
            tree["h"][i]["attn"]["c_proj"]["weight"],
            tree["h"][i]["mlp"]["c_fc"]["weight"],
            tree["h"][i]["mlp"]["c_proj"]["weight"],
        ]
        for i in sorted(tree["h"])
    ]
    return layers, tree["wte"]["embedding"]


def xla_seconds(params, batch: int) -> float:
    """Median seconds per step of the weight products alone, through the engine's own
    `rows_times` (the native kernel where the engine's decode step uses it), as stored."""
    layers, lm_head = jax.tree.map(jnp.asarray, step_weights(params))
    dtype = lm_head.dtype
    C = lm_head.shape[1]

    def product(x, w):  # x (B, C): one token a row, as a decode step gives it
        return rows_times(x[:, None, :].astype(dtype), w)[:, 0]

    def run(x, layers, lm_head):
        def step(x, _):
            for qkv_w, proj_w, fc_w, out_w in layers:
                x = x + product(product(x, qkv_w)[:, :C], proj_w)
                x = jnp.tanh(x + product(product(x, fc_w), out_w))
            return x + 1e-3 * product(x, lm_head)[:, :C], None

        return jax.lax.scan(step, x, None, length=STEPS)[0]

    x = jnp.ones((batch, C), jnp.float32) * 0.01
    times = call_seconds(jax.jit(run), x, layers, lm_head, repeats=3)
    return statistics.median(times) / STEPS


def torch_seconds(params, batch: int) -> float:
    """Median seconds per step of the same products in PyTorch (eager: on a CPU, Inductor
    leaves products to the same kernels), the weights in their stored dtype."""
    import torch
    import torch.nn.functional as F

    stored = step_weights(params)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        str(jnp.asarray(stored[1]).dtype)
    ]

    def tensor(a):  # through float32: numpy has no bfloat16 torch would take
        return torch.from_numpy(np.array(jnp.asarray(a, jnp.float32))).to(dtype)

    layers = [[tensor(w) for w in layer] for layer in stored[0]]
    lm_head = tensor(stored[1])
    C = lm_head.shape[1]

    @torch.no_grad()
    def run(x):
        for _ in range(STEPS):
            for qkv_w, proj_w, fc_w, out_w in layers:
                x = x + F.linear(F.linear(x, qkv_w)[:, :C], proj_w)
                x = torch.tanh(x + F.linear(F.linear(x, fc_w), out_w))
            x = x + 1e-3 * F.linear(x, lm_head)[:, :C]
        return x

    x = torch.full((batch, C), 0.01, dtype=dtype)
    times = call_seconds(run, x, repeats=3)  # a CPU tensor is ready when run returns
    return statistics.median(times) / STEPS


def products_bound(params, batch: int, torch_too: bool) -> dict:
    """ms per step of the weight products alone in each library, and the faster: the bound."""
    bound = {"xla_ms": 1e3 * xla_seconds(params, batch)}
    if torch_too:
        bound["torch_ms"] = 1e3 * torch_seconds(params, batch)
    library = min(bound, key=bound.get)
    return bound | {"bound_ms": bound[library], "bound_library": library.removesuffix("_ms")}
