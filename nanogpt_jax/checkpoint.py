"""Model checkpoints on disk: Orbax-saved params plus a JSON of config and tokenizer.

A checkpoint directory:

    DIR/nanogpt_jax.json   {"format": 1, "config": {...}, "tokenizer": {...}, "info": {...}}
    DIR/params/            the parameter tree, saved by orbax.checkpoint.StandardCheckpointer,
                           with sha256sums.json: each file's size and digest (see integrity.py)

A training run's `out_dir` holds the same JSON and an Orbax CheckpointManager directory
`checkpoints/<step>/params`; `params_dir` finds the newest step there, so both load the same way.

Writes are atomic: everything is written into a hidden sibling directory that takes the place
of the destination only when complete (in one step where the system can swap two paths), so a
write killed at any moment leaves the old checkpoint or the new one, never a mix; one that
fails is a UserError and leaves the old one. Loading checks the files' recorded sizes first,
their digests on request, then the array shapes against the config, before reading data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nanogpt_jax.config import GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.integrity import check_files, record_files
from nanogpt_jax.model import GPT
from nanogpt_jax.tokenizer import Tokenizer, tokenizer_from_description

METADATA_FILE = "nanogpt_jax.json"
PARAMS_DIR = "params"
TRAINING_DIR = "checkpoints"
FORMAT_VERSION = 1


def metadata(config: GPTConfig, tokenizer: Tokenizer, info: dict | None = None) -> dict:
    return {
        "format": FORMAT_VERSION,
        "config": config.to_dict(),
        "tokenizer": {**tokenizer.describe(), "vocab_size": tokenizer.vocab_size},
        "info": info or {},
    }


def write_metadata(directory: Path, meta: dict) -> None:
    """Replace DIR/nanogpt_jax.json atomically: a training run rewrites it at every save."""
    write_text_atomic(
        Path(directory) / METADATA_FILE, json.dumps(meta, indent=1, ensure_ascii=False) + "\n"
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file under a hidden name, then rename it into place: readers never see half."""
    temporary = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    temporary.write_text(text)
    os.replace(temporary, path)


def read_metadata(directory: str | Path) -> tuple[GPTConfig, Tokenizer, dict]:
    """Config, tokenizer and free-form info of a checkpoint or training directory."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{directory}: not a nanogpt-jax checkpoint (no {METADATA_FILE})")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{path}: unsupported format {meta.get('format')!r}")
        config = GPTConfig.from_dict(meta["config"])
        tokenizer = tokenizer_from_description(meta["tokenizer"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: corrupt checkpoint metadata ({type(e).__name__}: {e})") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{config.vocab_size}"
        )
    return config, tokenizer, meta.get("info", {})


def save_model(
    directory: str | Path,
    params: dict,
    config: GPTConfig,
    tokenizer: Tokenizer,
    *,
    info: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory atomically. `params` is GPT's parameter tree (a dict)."""
    directory = Path(directory).absolute()
    refuse_existing(directory, overwrite)
    with replacing(directory) as staging:
        staging.mkdir()
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, params)
        record_files(staging / PARAMS_DIR)
        write_metadata(staging, metadata(config, tokenizer, info))
    return directory


def refuse_existing(directory: str | Path, overwrite: bool) -> None:
    """Conversions and exports never replace a directory unless told to."""
    if Path(directory).exists() and not overwrite:
        raise UserError(f"{directory} already exists (pass --force to overwrite it)")


@contextlib.contextmanager
def replacing(target: Path):
    """A hidden sibling path of `target` to write into (the block creates it): it takes the
    place of `target` when the block ends without error, and is removed either way. Hidden
    siblings that a killed writer left behind are removed after a successful replace."""
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_replace(target)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        yield staging
        replace_directory(staging, target)
    except UserError:
        raise
    except Exception as e:  # a full disk, a file-size limit: Orbax and torch raise many types
        kept = "the previous one is unchanged" if target.exists() else "nothing was written"
        raise UserError(f"{target}: writing failed, {kept} ({first_line_of(e)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.*-*"):
        if stale.name.split(".")[-1].startswith(("partial-", "old-")):
            shutil.rmtree(stale, ignore_errors=True)


def replace_directory(new: Path, target: Path) -> None:
    """Move `new` to `target`. An existing `target` is swapped with `new` in one step where
    the system can (Linux's renameat2 with RENAME_EXCHANGE), so at every instant `target` is
    the old directory or the new one; `new` then holds the old one, for the caller to remove.
    Elsewhere the old `target` is moved aside first (`.NAME.old-*`) and removed after."""
    if target.exists() and exchange(new, target):
        return
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_replace(target: Path) -> None:
    """Put back the old `target` that a writer moved aside and was killed before moving the
    new one in (the two-rename fallback of `replace_directory`): it is the last complete copy."""
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        os.rename(aside[-1], target)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def params_dir(directory: str | Path) -> Path:
    """The Orbax params directory of a checkpoint, or of a training run's newest step."""
    directory = Path(directory)
    restore_interrupted_replace(directory / PARAMS_DIR)  # a training run's best params
    if (directory / PARAMS_DIR).is_dir():
        return directory / PARAMS_DIR
    steps = sorted(
        (int(p.name), p)
        for p in (directory / TRAINING_DIR).glob("*")
        if p.name.isdigit() and (p / PARAMS_DIR).is_dir()
    )
    if not steps:
        raise UserError(f"{directory}: no saved parameters in it")
    return steps[-1][1] / PARAMS_DIR


def abstract_model(config: GPTConfig, dtype=jax.numpy.float32) -> GPT:
    """GPT with shapes and dtypes but no memory behind them: the target for restoring."""
    return nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0), dtype=dtype))


def check_params_files(path: Path, verify: bool) -> None:
    """Sizes (and with `verify`, digests) of a params directory's files against the record
    written with them: in the directory itself, or in a training step's directory above it."""
    if not check_files(path, verify=verify):
        check_files(path.parent, verify=verify, prefix=f"{path.name}/")


def restore_params(path: str | Path, target: dict) -> dict:
    """Restore a parameter tree shaped like `target` (a tree of ShapeDtypeStructs or arrays)."""
    path = Path(path)
    abstract = jax.tree.map(on_default_device, target)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            check_stored_shapes(path, checkpointer.metadata(path.absolute()), abstract)
            return checkpointer.restore(path.absolute(), abstract)
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"{path}: missing checkpoint files ({e})") from None
    except Exception as e:  # Orbax and TensorStore raise many types for unreadable data
        raise UserError(f"{path}: damaged checkpoint ({first_line_of(e)})") from None


def check_stored_shapes(path: Path, stored, target: dict) -> None:
    """Compare the arrays Orbax recorded (its metadata file, no data read) with the model's."""
    tree = getattr(stored, "item_metadata", stored)

    def shapes(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {".".join(str(getattr(k, "key", k)) for k in p): tuple(x.shape) for p, x in leaves}

    on_disk, wanted = shapes(tree), shapes(target)
    for name in sorted(wanted.keys() | on_disk.keys()):
        if name not in on_disk:
            raise UserError(f"{path}: checkpoint does not match the model (no {name} in it)")
        if name not in wanted:
            raise UserError(f"{path}: checkpoint does not match the model ({name} is extra)")
        if on_disk[name] != wanted[name]:
            raise UserError(
                f"{path}: checkpoint does not match the model ({name} is {on_disk[name]} on "
                f"disk, {wanted[name]} for its config)"
            )


def first_line_of(error: BaseException) -> str:
    """The innermost cause's first line: TensorStore wraps the reason in generic errors, and
    names an operating-system error by its number (a full disk: "No space left on device")."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    code = re.search(r"\[os_error_code='?(\d+)'?\]", text)
    if code:
        return os.strerror(int(code.group(1)))
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def on_default_device(leaf) -> jax.ShapeDtypeStruct:
    """A restore target; without a sharding of its own, the array goes to the default device.
    (Left to itself, Orbax would use the device recorded at saving, cpu:0 or cuda:0, and fail
    on a machine without one.)"""
    leaf = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(leaf, "sharding", None) is not None:
        return leaf
    device = jax.sharding.SingleDeviceSharding(default_device())
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)


def default_device() -> jax.Device:
    """Where arrays go unless placed: JAX's jax_default_device (`--device=cuda:1` sets it), or
    the first device."""
    device = jax.config.jax_default_device
    return device if isinstance(device, jax.Device) else jax.devices()[0]


def load_params(directory: str | Path, config: GPTConfig, mesh=None, verify=False) -> dict:
    """The float32 parameter tree of a checkpoint or training directory. With a mesh, every
    array is restored already split over its devices: a process reads only its parts. The
    files' sizes are checked first, and with `verify` their digests."""
    skeleton = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    if mesh is not None:
        skeleton = storage_shardings(skeleton, config, mesh)
    path = params_dir(directory)
    check_params_files(path, verify)
    return restore_params(path, skeleton)


def storage_shardings(skeleton: dict, config: GPTConfig, mesh) -> dict:
    """ShapeDtypeStructs carrying the sharding each stored (unreshaped) array is read into."""
    from jax.sharding import NamedSharding

    from nanogpt_jax.sharding import param_spec

    def with_sharding(path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        spec = param_spec(names, leaf.shape, config, mesh)
        if names[-2:] == ("c_attn", "weight") or names[-2:] == ("c_attn", "bias"):
            spec = type(spec)(*spec[1:])  # stored (3C, ...): split its rows, not a (3,) axis
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(with_sharding, skeleton)


def params_of(model: GPT) -> dict:
    """The model's parameters as a plain nested dict of arrays (what Orbax saves)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def count_params(params: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
