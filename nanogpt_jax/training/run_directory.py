"""A training run's directory:

    out_dir/nanogpt_jax.json        config and tokenizer of the model (what `load` reads)
    out_dir/checkpoints/<iter>/     Orbax CheckpointManager step: everything needed to resume
        params/                     the parameter tree (StandardCheckpointer layout)
        opt_state/                  AdamW moments and step count
        progress/                   JSON: iter, best_val_loss, elapsed_s, the run's settings
        sha256sums.json             sizes and checksums of the files above (integrity.py),
                                    checked before resuming; the step before stays too
    out_dir/params/                 only with always_save_checkpoint=False: the best-val params,
                                    which `checkpoint.params_dir` prefers over the newest step
    out_dir/metrics.jsonl           one JSON object per evaluation

Orbax commits a step by renaming it into place, and the JSON files are replaced atomically,
so an interrupted run leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from nanogpt_jax.checkpoint import (
    PARAMS_DIR,
    TRAINING_DIR,
    first_line_of,
    on_default_device,
    replacing,
    write_text_atomic,
)
from nanogpt_jax.errors import UserError
from nanogpt_jax.integrity import check_files, record_files

METRICS_FILE = "metrics.jsonl"


class RunDirectory:
    """Saves and restores training checkpoints of one out_dir. Use as a context manager."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir).absolute()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            # the step before the newest stays, in case the newest is found damaged
            max_to_keep=2,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,  # what a killed run left half-written
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
        """A new step, committed by Orbax's rename: a failed write leaves the older ones."""
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    progress=ocp.args.JsonSave(progress),
                ),
            )
            self.manager.wait_until_finished()
            record_files(self.step_dir(step))
        except Exception as e:  # a full disk, a file-size limit
            kept = f"; {self.step_dir(self.latest_step())} is intact" if self.latest_step() else ""
            raise UserError(
                f"{self.step_dir(step)}: writing the checkpoint failed{kept} ({first_line_of(e)})"
            ) from None

    def step_dir(self, step: int) -> Path:
        return self.out_dir / TRAINING_DIR / str(step)

    def restore(self, abstract_params, abstract_opt_state) -> tuple[dict, object, dict]:
        """params, opt_state and progress of the newest step, shaped like the abstract trees."""
        step = self.latest_step()
        if step is None:
            raise UserError(f"{self.out_dir}: no checkpoint to resume from")
        try:
            # a read that fails halfway leaves Orbax's other reads running, each printing a
            # traceback: damage is found first (a step saved without a record is read as is)
            check_files(self.step_dir(step), verify=True)
        except UserError as e:
            raise UserError(f"{e}{self.fallback_note(step)}") from None
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
                f"({type(e).__name__}: {reason[:200]}){self.fallback_note(step)}"
            ) from None
        return restored["params"], restored["opt_state"], progress

    def fallback_note(self, damaged: int) -> str:
        """Where to resume from instead of a damaged step: the newest older step that is
        intact, named so the user moves the damaged one away (nothing is deleted here)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if step >= damaged:
                continue
            try:
                if check_files(self.step_dir(step), verify=True):
                    return (
                        f"; {self.step_dir(step)} (iteration {step}) is intact: move "
                        f"{self.step_dir(damaged)} out of the way to resume from it"
                    )
            except UserError:
                continue
        return "; no earlier intact checkpoint"

    def save_best_params(self, params: dict) -> None:
        """out_dir/params, replaced atomically: the model that `load(out_dir)` serves."""
        with replacing(self.out_dir / PARAMS_DIR) as staging:
            with ocp.StandardCheckpointer() as checkpointer:  # closed: its writes complete
                checkpointer.save(staging, params)
            record_files(staging)

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


def iter_of(line: str) -> float:
    """The iteration of a metrics line; a line cut short by a crash counts as never written."""
    try:
        return json.loads(line)["iter"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def abstract_tree(tree):
    """Shapes, dtypes and the default device of a tree of arrays (a restore target)."""
    return jax.tree.map(on_default_device, tree)
