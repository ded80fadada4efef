"""`load()`: a checkpoint, preset or built-in model as a ready-to-use bundle."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nanogpt_jax.checkpoint import (
    METADATA_FILE,
    abstract_model,
    load_params,
    read_metadata,
    restore_interrupted_replace,
    save_model,
)
from nanogpt_jax.config import PRESETS, GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.home import cache_home
from nanogpt_jax.sharding import shard_params
from nanogpt_jax.tokenizer import Tokenizer

BUILTIN_DIR = Path(__file__).parent / "pretrained"
BUILTIN_MODELS = ("shakespeare-char",)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass
class ModelBundle:
    """A model with its tokenizer. Parameters live in `params`, split from `graphdef`, so jitted
    functions take them as arguments (no model object is closed over)."""

    config: GPTConfig
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    params: nnx.State
    dtype: str = "float32"  # compute dtype
    info: dict = field(default_factory=dict)
    mesh: Mesh | None = None  # devices the params and batches are spread over
    engine: object = field(default=None, repr=False)  # the Engine's compiled programs, if any

    def logits(self, ids) -> jax.Array:
        """Float32 logits (B, T, V) for token ids (B, T), T <= block_size."""
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim != 2:
            raise UserError(f"ids must be a (batch, time) array, got shape {ids.shape}")
        if ids.shape[1] > self.config.block_size:
            raise UserError(
                f"{ids.shape[1]} tokens exceed block_size={self.config.block_size}; "
                "crop them or use generate(), which slides the window"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise UserError(f"token ids must lie in [0, {self.config.vocab_size})")
        return forward_logits(self.graphdef, self.params, ids)

    def generate(self, prompts, **options):
        """Sample continuations; see `nanogpt_jax.generate.generate` for the options."""
        # Imported here: generate builds on the bundle, so the bundle cannot import it first.
        from nanogpt_jax.generate import generate

        return generate(self, prompts, **options)


@functools.partial(jax.jit, static_argnums=0)
def forward_logits(graphdef: nnx.GraphDef, params: nnx.State, ids: jax.Array) -> jax.Array:
    logits, _ = nnx.merge(graphdef, params)(ids)
    return logits


def make_bundle(
    config: GPTConfig,
    tokenizer: Tokenizer,
    params: dict,
    dtype: str = "float32",
    info: dict | None = None,
    mesh: Mesh | None = None,
) -> ModelBundle:
    """Bundle a parameter tree. For bfloat16/float16 inference the matrices are cast to that
    dtype too (halving the bytes read per token); LayerNorms and biases stay float32. With a
    mesh, parameters are placed as `nanogpt_jax.sharding` describes."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    compute = DTYPES[dtype]
    params = jax.tree.map(
        lambda x: x.astype(compute) if (compute != jnp.float32 and x.ndim >= 2) else x, params
    )
    if mesh is not None:
        params = shard_params(params, config, mesh)
    graphdef, state = nnx.split(abstract_model(config, compute))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return ModelBundle(config, tokenizer, graphdef, state, dtype, info or {}, mesh=mesh)


def load(
    name_or_path: str | os.PathLike,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    verify: bool = False,
    meta: str | None = None,
) -> ModelBundle:
    """Load a model by checkpoint path, preset name (gpt2 ... gpt2-xl) or built-in name.

    Presets are downloaded from the Hugging Face hub and converted on first use, then cached
    under `cache_home()`. PyTorch weights that are not a preset (a Hugging Face GPT-2 directory,
    a nanoGPT ckpt.pt or the run directory holding it) are converted in memory at every load;
    scripts/convert.py saves that work. `dtype` is the compute dtype: float32, or bfloat16 for
    accelerators. With a `mesh` (see `nanogpt_jax.sharding.make_mesh`), each process reads only
    the parts of the parameters its devices hold. The checkpoint's files are checked against
    the sizes recorded when they were written, and with `verify` against their SHA-256 too.
    `meta` names a nanoGPT ckpt.pt's meta.pkl when it is not where nanoGPT's sample.py looks.
    """
    path = resolve(str(name_or_path))
    config, tokenizer, params, info = read_model(path, mesh, verify, meta)
    return make_bundle(config, tokenizer, params, dtype, info, mesh)


def read_model(
    path: Path, mesh: Mesh | None = None, verify: bool = False, meta: str | None = None
) -> tuple[GPTConfig, Tokenizer, dict, dict]:
    """Config, tokenizer, parameter tree and info of a checkpoint directory, or of PyTorch
    weights (see `pytorch_weights`) converted in memory."""
    weights = pytorch_weights(path)
    if weights is None:
        if meta:
            raise UserError(f"--meta is for a nanoGPT ckpt.pt; {path} is a checkpoint directory")
        config, tokenizer, info = read_metadata(path)
        return config, tokenizer, load_params(path, config, mesh, verify), info
    from nanogpt_jax.interop.convert import convert

    print(f"converting {weights} (save it with scripts/convert.py to skip this)", file=sys.stderr)
    converted = convert(str(weights), meta)  # host arrays, placed by the caller
    if converted.vocabulary:
        print(f"vocabulary: {converted.vocabulary}", file=sys.stderr)
    return converted.config, converted.tokenizer, converted.params, {"source": converted.source}


def pytorch_weights(path: Path) -> Path | None:
    """What to convert, when `path` holds PyTorch GPT-2 weights rather than a nanogpt-jax
    checkpoint: a weights file, a nanoGPT run directory's ckpt.pt, a Hugging Face directory."""
    if (path / METADATA_FILE).is_file():
        return None
    if path.is_file():
        return path
    if (path / "ckpt.pt").is_file():
        return path / "ckpt.pt"
    if (path / "config.json").is_file():
        return path
    return None


def resolve(name_or_path: str) -> Path:
    if name_or_path in BUILTIN_MODELS:
        path = BUILTIN_DIR / name_or_path
        if not path.is_dir():
            raise UserError(f"built-in model {name_or_path} is missing from this installation")
        return path
    if name_or_path in PRESETS:
        path = cache_home() / "models" / name_or_path
        if not path.is_dir():
            from nanogpt_jax.interop.convert import convert

            print(f"converting {name_or_path} into {path} (first use)", file=sys.stderr)
            converted = convert(name_or_path)
            save_model(
                path,
                converted.params,
                converted.config,
                converted.tokenizer,
                info={"source": converted.source},
            )
        return path
    path = Path(name_or_path)
    restore_interrupted_replace(path)
    if not path.exists():
        names = ", ".join([*BUILTIN_MODELS, *PRESETS])
        raise UserError(
            f"{name_or_path}: no such checkpoint directory, and not a model name ({names})"
        )
    return path


def as_token_rows(prompts, tokenizer: Tokenizer) -> list[list[int]]:
    """Prompts (a string, a list of strings, or lists of ids) as lists of token ids."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, np.ndarray | jax.Array):
        prompts = np.asarray(prompts).reshape(-1, np.asarray(prompts).shape[-1]).tolist()
    elif prompts and isinstance(prompts[0], int | np.integer):
        prompts = [list(prompts)]
    return [tokenizer.encode(p) if isinstance(p, str) else [int(i) for i in p] for p in prompts]
