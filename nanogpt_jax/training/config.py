"""TrainConfig: nanoGPT's train.py settings with its defaults, checked on construction.

Kept free of JAX imports so that a command line is validated before any backend starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import flag

PRETRAINED_NOTE = "scratch | resume | gpt2 ... gpt2-xl | shakespeare-char | a checkpoint dir"


@dataclass(frozen=True)
class TrainConfig:
    # I/O
    out_dir: str = flag("out", "run directory: checkpoints/, nanogpt_jax.json, metrics.jsonl")
    eval_interval: int = flag(2000, "evaluate and checkpoint every this many iterations")
    log_interval: int = flag(1, "print a training line every this many iterations")
    eval_iters: int = flag(200, "batches per split in each evaluation")
    eval_only: bool = flag(False, "evaluate once and exit")
    always_save_checkpoint: bool = flag(True, "False: out_dir serves the best-val params")
    init_from: str = flag("scratch", PRETRAINED_NOTE)
    meta: str | None = flag(None, "a nanoGPT ckpt.pt's meta.pkl, for init_from=ckpt.pt")
    # Weights & Biases logging (wandb is imported only when wandb_log is True)
    wandb_log: bool = flag(False, "send each evaluation to Weights & Biases (pip install wandb)")
    wandb_project: str = flag("owt", "the wandb project")
    wandb_run_name: str = flag("gpt2", "the wandb run's name")
    # data
    dataset: str = flag("openwebtext", "names the data directory, data/<dataset>")
    data_dir: str | None = flag(None, "default: data/<dataset>")
    # nanoGPT's 5 * 8 (it divides by its 8 GPUs; one process here)
    gradient_accumulation_steps: int = flag(40, "micro-batches per optimizer step")
    batch_size: int = flag(12, "sequences per micro-batch")
    block_size: int = flag(1024, "context length in tokens")
    # model (init_from=scratch; pretrained and resumed models keep their own shape)
    n_layer: int = flag(12, "transformer blocks")
    n_head: int = flag(12, "attention heads per block")
    n_embd: int = flag(768, "channels of the residual stream")
    dropout: float = flag(0.0, "dropout rate while training (0.0 for pretraining)")
    bias: bool = flag(False, "biases in Linear and LayerNorm layers (GPT-2: True)")
    # AdamW
    learning_rate: float = flag(6e-4, "peak learning rate")
    max_iters: int = flag(600000, "total optimizer steps")
    weight_decay: float = flag(1e-1, "AdamW decay of the 2-D weights (not biases, norms)")
    beta1: float = flag(0.9, "AdamW first-moment decay")
    beta2: float = flag(0.95, "AdamW second-moment decay")
    grad_clip: float = flag(1.0, "clip gradients to this global norm; 0 disables clipping")
    # learning-rate schedule
    decay_lr: bool = flag(True, "False: learning_rate throughout")
    warmup_iters: int = flag(2000, "linear warmup from 0 over this many iterations")
    lr_decay_iters: int = flag(600000, "cosine decay to min_lr ends here (~max_iters)")
    min_lr: float = flag(6e-5, "learning rate after the decay (~learning_rate / 10)")
    # system
    backend: str = flag("nccl", "accepted for nanoGPT command lines; a no-op, one process trains")
    device: str | None = flag(None, "cpu | gpu | tpu, or cuda:1 (default: JAX's default backend)")
    dtype: str | None = flag(None, "compute dtype float32 | bfloat16 (default: float32 on cpu)")
    compile: bool = flag(True, "accepted for nanoGPT command lines; a no-op, jax.jit compiles")
    seed: int = flag(1337, "parameter init, dropout and batch streams all derive from it")
    peak_flops: float | None = flag(None, "device peak FLOP/s for MFU (default: known GPUs/TPUs)")

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
