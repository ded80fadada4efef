"""TrainConfig: nanoGPT's train.py settings with its defaults, checked on construction.

Kept free of JAX imports so that a command line is validated before any backend starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nanogpt_jax.errors import UserError

PRETRAINED_NOTE = "scratch | resume | gpt2 ... gpt2-xl | shakespeare-char | a checkpoint dir"


def doc(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    # I/O
    out_dir: str = doc("out", "run directory: checkpoints/, nanogpt_jax.json, metrics.jsonl")
    eval_interval: int = doc(2000, "evaluate and checkpoint every this many iterations")
    log_interval: int = 1
    eval_iters: int = doc(200, "batches per split in each evaluation")
    eval_only: bool = doc(False, "evaluate once and exit")
    always_save_checkpoint: bool = doc(True, "False: out_dir serves the best-val params")
    init_from: str = doc("scratch", PRETRAINED_NOTE)
    # data
    dataset: str = "openwebtext"
    data_dir: str | None = doc(None, "default: data/<dataset>")
    gradient_accumulation_steps: int = 40  # nanoGPT's 5 * 8 (it divides by 8 GPUs; one here)
    batch_size: int = 12
    block_size: int = 1024
    # model (init_from=scratch; pretrained and resumed models keep their own shape)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False
    # AdamW
    learning_rate: float = 6e-4
    max_iters: int = doc(600000, "total optimizer steps")
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = doc(1.0, "clip gradients to this global norm; 0 disables clipping")
    # learning-rate schedule
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    min_lr: float = 6e-5
    # system
    device: str | None = doc(None, "cpu | gpu | tpu (default: JAX's default backend)")
    dtype: str | None = doc(None, "compute dtype float32 | bfloat16 (default: float32 on cpu)")
    compile: bool = doc(True, "accepted for nanoGPT command lines; a no-op, jax.jit compiles")
    seed: int = doc(1337, "parameter init, dropout and batch streams all derive from it")
    peak_flops: float | None = doc(None, "device peak FLOP/s for MFU (default: known GPUs/TPUs)")

    def __post_init__(self):
        positive = (
            "eval_interval",
            "log_interval",
            "eval_iters",
            "gradient_accumulation_steps",
            "batch_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        non_negative = (
            "max_iters",
            "warmup_iters",
            "lr_decay_iters",
            "learning_rate",
            "min_lr",
            "weight_decay",
            "grad_clip",
            "seed",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.decay_lr and self.lr_decay_iters < self.warmup_iters:
            raise UserError(
                f"lr_decay_iters={self.lr_decay_iters} is shorter than "
                f"warmup_iters={self.warmup_iters}"
            )
        if self.dtype not in (None, "float32", "bfloat16"):
            hint = " (float16 would need loss scaling)" if self.dtype == "float16" else ""
            raise UserError(f"dtype must be float32 or bfloat16{hint}, got {self.dtype!r}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise UserError(f"peak_flops must be positive, got {self.peak_flops}")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir if self.data_dir is not None else Path("data") / self.dataset)

    @property
    def tokens_per_iter(self) -> int:
        return self.gradient_accumulation_steps * self.batch_size * self.block_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
