"""Placing a model and its batch on a device mesh with `data` and `model` axes.

Rows of the batch are split over `data`. Parameters are split over `model` Megatron-style:

    attn.c_attn   column-parallel: each device holds the query, key and value of its heads
    attn.c_proj   row-parallel over the same heads
    mlp.c_fc      column-parallel over the hidden units
    mlp.c_proj    row-parallel over the hidden units
    wte           over the vocabulary (the tied lm_head then yields vocabulary-sharded logits)
    wpe, ln_*     replicated

and the KV cache follows the heads. Only annotations are written here: XLA's SPMD partitioner
inserts the collectives. A dimension that does not divide evenly stays replicated (GPT-2-xl's
25 heads over 2 devices; the hub's 50257-token vocabulary; nanoGPT's padded 50304 divides).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanogpt_jax.config import GPTConfig
from nanogpt_jax.errors import UserError

AXES = ("data", "model")


def mesh_sizes(spec: str) -> dict[str, int]:
    """{'data': 4, 'model': 2} from 'data:4,model:2' (an axis left out has size 1)."""
    sizes = {"data": 1, "model": 1}
    for part in spec.split(","):
        name, _, size = part.partition(":")
        if name.strip() not in sizes or not size.strip().isdigit() or int(size) < 1:
            raise UserError(f"mesh {spec!r}: write it as data:N,model:M")
        sizes[name.strip()] = int(size)
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A mesh from 'data:4,model:2' (default: every device on `data`)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(spec) if spec else {"data": len(devices), "model": 1}
    if sizes["data"] * sizes["model"] != len(devices):
        raise UserError(
            f"mesh data:{sizes['data']},model:{sizes['model']} needs "
            f"{sizes['data'] * sizes['model']} devices, {len(devices)} are available"
        )
    grid = np.array(devices).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES)


def model_parallel(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["model"]


def heads_split(config: GPTConfig, mesh: Mesh | None) -> bool:
    return model_parallel(mesh) > 1 and config.n_head % model_parallel(mesh) == 0


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], config, mesh) -> P:
    """The PartitionSpec of one parameter, by its GPT-2 name."""
    m = model_parallel(mesh)
    name = "/".join(path)
    if m == 1:
        return P()
    heads = heads_split(config, mesh)
    if name.endswith("attn/c_attn/weight"):  # (3, C, C) in sharded inference
        return P(None, "model", None) if heads else P()
    if name.endswith("attn/c_attn/bias"):  # (3, C)
        return P(None, "model") if heads else P()
    if name.endswith("attn/c_proj/weight"):  # (C, C), input over heads
        return P(None, "model") if heads else P()
    if name.endswith("mlp/c_fc/weight"):  # (4C, C)
        return P("model", None) if shape[0] % m == 0 else P()
    if name.endswith("mlp/c_fc/bias"):  # (4C,)
        return P("model") if shape[0] % m == 0 else P()
    if name.endswith("mlp/c_proj/weight"):  # (C, 4C)
        return P(None, "model") if shape[1] % m == 0 else P()
    if name == "wte/embedding":  # (V, C)
        return P("model", None) if shape[0] % m == 0 else P()
    return P()


def split_qkv(params: dict, config: GPTConfig) -> dict:
    """c_attn (3C, C) -> (3, C, C), so that a head's query, key and value can share a device."""
    C = config.n_embd
    out = jax.tree.map(lambda x: x, params)
    for block in out["h"].values():
        attn = block["attn"]["c_attn"]
        attn["weight"] = attn["weight"].reshape(3, C, C)
        if "bias" in attn:
            attn["bias"] = attn["bias"].reshape(3, C)
    return out


def shard_params(params: dict, config: GPTConfig, mesh: Mesh) -> dict:
    """Place a parameter tree (plain dict) on `mesh`, in the layout sharded inference uses."""
    params = split_qkv(params, config)

    def place(path, value):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        spec = param_spec(names, value.shape, config, mesh)
        return jax.device_put(value, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over `data`, everything else whole."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def cache_sharding(config: GPTConfig, mesh: Mesh) -> NamedSharding:
    """The (B, H, S, D) cache: rows over `data`, heads over `model` when they divide."""
    return NamedSharding(mesh, P("data", "model" if heads_split(config, mesh) else None))


def initialize_distributed() -> bool:
    """Join a multi-process run when the usual environment is set:
    JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID; or, on Cloud TPU
    pod slices and SLURM, NANOGPT_JAX_DISTRIBUTED=1 lets JAX find them itself."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address or os.environ.get("NANOGPT_JAX_DISTRIBUTED") == "1":
        # CPU devices of several processes talk through gloo (GPUs and TPUs have their own)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        try:
            jax.distributed.initialize(
                coordinator_address=address,
                num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                process_id=int(os.environ["JAX_PROCESS_ID"]),
            )
        except KeyError as e:
            raise UserError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not") from None
        return True
    if os.environ.get("NANOGPT_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def global_array(value, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full, as one array over the whole mesh."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(value) -> np.ndarray:
    """A (possibly multi-process) array gathered into one host numpy array."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)
