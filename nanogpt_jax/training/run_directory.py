"""A training run's directory:

    out_dir/nanogpt_jax.json        config and tokenizer of the model (what `load` reads)
    out_dir/checkpoints/<iter>/     Orbax CheckpointManager step: everything needed to resume
        params/                     the parameter tree (StandardCheckpointer layout)
        opt_state/                  AdamW moments and step count
        progress/                   JSON: iter, best_val_loss, elapsed_s, the run's settings
        sha256sums.json             checksums of the files above, checked before resuming
    out_dir/params/                 only with always_save_checkpoint=False: the best-val params,
                                    which `checkpoint.params_dir` prefers over the newest step
    out_dir/metrics.jsonl           one JSON object per evaluation

Orbax commits a step by renaming it into place, and the JSON files are replaced atomically,
so an interrupted run leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from nanogpt_jax.checkpoint import (
    PARAMS_DIR,
    TRAINING_DIR,
    on_default_device,
    replacing,
    write_text_atomic,
)
from nanogpt_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"
DIGEST_FILE = "sha256sums.json"  # beside Orbax's items in each step directory


class RunDirectory:
    """Saves and restores training checkpoints of one out_dir. Use as a context manager."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir).absolute()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.out_dir / TRAINING_DIR, options=options)

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.manager.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def has_model(self) -> bool:
        return self.latest_step() is not None or (self.out_dir / PARAMS_DIR).exists()

    def save(self, step: int, params: dict, opt_state, progress: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                progress=ocp.args.JsonSave(progress),
            ),
        )
        self.manager.wait_until_finished()
        step_dir = self.step_dir(step)
        digests = json.dumps(file_digests(step_dir), indent=1)
        write_text_atomic(step_dir / DIGEST_FILE, digests + "\n")

    def step_dir(self, step: int) -> Path:
        return self.out_dir / TRAINING_DIR / str(step)

    def restore(self, abstract_params, abstract_opt_state) -> tuple[dict, object, dict]:
        """params, opt_state and progress of the newest step, shaped like the abstract trees."""
        step = self.latest_step()
        if step is None:
            raise UserError(f"{self.out_dir}: no checkpoint to resume from")
        check_digests(self.step_dir(step))
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                    progress=ocp.args.JsonRestore(),
                ),
            )
            progress = dict(restored["progress"])
            progress["iter"], progress["best_val_loss"] = (
                int(progress["iter"]),
                float(progress["best_val_loss"]),
            )
        except Exception as e:  # Orbax, TensorStore and JSON raise many types on damaged files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{self.step_dir(step)}: cannot resume from this checkpoint "
                f"({type(e).__name__}: {reason[:200]})"
            ) from None
        return restored["params"], restored["opt_state"], progress

    def save_best_params(self, params: dict) -> None:
        """out_dir/params, replaced atomically: the model that `load(out_dir)` serves."""
        # the checkpointer closes (its writes complete) before the rename
        with replacing(self.out_dir / PARAMS_DIR) as staging, ocp.StandardCheckpointer() as ckpt:
            ckpt.save(staging, params)

    def append_metrics(self, record: dict) -> None:
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def keep_metrics_until(self, iter_num: int) -> None:
        """Drop evaluations after `iter_num`: a resumed run repeats those iterations."""
        path = self.out_dir / METRICS_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if iter_of(line) <= iter_num]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file below `directory`, by relative path."""
    return {
        path.relative_to(directory).as_posix(): sha256_of(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != DIGEST_FILE
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_digests(step_dir: Path) -> None:
    """Find damaged files before Orbax reads them: a read that fails halfway leaves Orbax's
    other reads running, and each of them prints a traceback of its own. A step without a
    digest file (a crash right after Orbax committed it) is restored unchecked."""
    path = step_dir / DIGEST_FILE
    if not path.is_file():
        return
    try:
        expected = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: damaged checksum file") from None
    for name, digest in expected.items():
        file = step_dir / name
        if not file.is_file():
            raise UserError(f"{step_dir}: damaged checkpoint, {name} is missing")
        if sha256_of(file) != digest:
            raise UserError(f"{step_dir}: damaged checkpoint, {name} has changed since saved")


def iter_of(line: str) -> float:
    """The iteration of a metrics line; a line cut short by a crash counts as never written."""
    try:
        return json.loads(line)["iter"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def abstract_tree(tree):
    """Shapes, dtypes and the default device of a tree of arrays (a restore target)."""
    return jax.tree.map(on_default_device, tree)
