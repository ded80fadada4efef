"""Where a training run begins: a new model, the newest checkpoint of out_dir (resume), or a
pretrained checkpoint to fine-tune (nanoGPT's init_from)."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from nanogpt_jax.bundle import read_model, resolve
from nanogpt_jax.checkpoint import abstract_model, params_of, read_metadata
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.model import GPT
from nanogpt_jax.tokenizer import Tokenizer
from nanogpt_jax.training.config import TrainConfig
from nanogpt_jax.training.data import Dataset
from nanogpt_jax.training.run_directory import RunDirectory, abstract_tree

GPT2_PADDED_VOCAB = 50304  # nanoGPT's vocabulary size for datasets without meta.pkl
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "bias")
# settings that change the steps taken: a resumed run repeats an uninterrupted one only if
# these are unchanged
TRAJECTORY = (
    "dataset",
    "data_dir",
    "gradient_accumulation_steps",
    "batch_size",
    "dropout",
    "learning_rate",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "decay_lr",
    "warmup_iters",
    "lr_decay_iters",
    "min_lr",
    "dtype",
    "seed",
)


@dataclasses.dataclass
class Start:
    """Where a run begins: the model, its tokenizer and, when resuming, the optimizer state."""

    model_config: GPTConfig
    tokenizer: Tokenizer
    params: dict
    opt_state: object = None
    progress: dict = dataclasses.field(default_factory=dict)  # iter, best_val_loss, elapsed_s
    origin: str = "scratch"  # what the run was first initialized from (kept across resumes)


def starting_point(
    config: TrainConfig, dataset: Dataset, run: RunDirectory, optimizer, init_key, log
) -> Start:
    """The model a run starts from: new, resumed from out_dir, or a pretrained checkpoint."""
    if config.init_from == "resume":
        return resumed(config, dataset, run, optimizer, log)
    if run.has_model():
        raise UserError(
            f"{run.out_dir} already holds a training run: continue it with --init_from=resume, "
            "or choose another --out_dir"
        )
    if config.init_from == "scratch":
        char_level = dataset.tokenizer.describe()["kind"] == "char"
        model_config = GPTConfig(
            block_size=config.block_size,
            vocab_size=dataset.tokenizer.vocab_size if char_level else GPT2_PADDED_VOCAB,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            dropout=config.dropout,
            bias=config.bias,
        )
        model = GPT(model_config, rngs=nnx.Rngs(params=init_key))
        return Start(model_config, dataset.tokenizer, params_of(model))
    return pretrained(config, dataset, log)


def pretrained(config: TrainConfig, dataset: Dataset, log) -> Start:
    """Fine-tune a converted GPT-2, built-in model, checkpoint directory or PyTorch weights
    (nanoGPT's init_from=gpt2*): its shape and weights, this run's dropout, cropped to
    block_size."""
    model_config, tokenizer, params, _ = read_model(resolve(config.init_from), meta=config.meta)
    check_tokenizer(dataset, tokenizer, config.init_from)
    note_model_shape(config, model_config, config.init_from, log)
    if config.block_size > model_config.block_size:
        raise UserError(
            f"block_size={config.block_size} exceeds the block_size {model_config.block_size} "
            f"of {config.init_from}"
        )
    if config.block_size < model_config.block_size:  # nanoGPT's crop_block_size
        params["wpe"]["embedding"] = params["wpe"]["embedding"][: config.block_size]
    model_config = model_config.replace(block_size=config.block_size, dropout=config.dropout)
    return Start(model_config, tokenizer, params, origin=config.init_from)


def resumed(config: TrainConfig, dataset: Dataset, run: RunDirectory, optimizer, log) -> Start:
    """The newest checkpoint of out_dir with its optimizer state and progress."""
    if run.latest_step() is None:
        raise UserError(f"{run.out_dir}: no checkpoint to resume from")
    model_config, tokenizer, info = read_metadata(run.out_dir)
    check_tokenizer(dataset, tokenizer, run.out_dir)
    if config.block_size != model_config.block_size:
        raise UserError(
            f"block_size={config.block_size} differs from the run's {model_config.block_size}"
        )
    note_model_shape(config, model_config, run.out_dir, log)
    model_config = model_config.replace(dropout=config.dropout)
    skeleton = nnx.to_pure_dict(nnx.state(abstract_model(model_config), nnx.Param))
    abstract_opt_state = jax.eval_shape(optimizer.init, skeleton)
    params, opt_state, progress = run.restore(
        abstract_tree(skeleton), abstract_tree(abstract_opt_state)
    )
    before = progress.get("config", {})
    changed = [
        f"{key}={getattr(config, key)!r} (was {before.get(key)!r})"
        for key in TRAJECTORY
        if before.get(key) != getattr(config, key)
    ]
    if changed:
        log(f"resume: settings changed since the checkpoint: {', '.join(changed)}")
    log(f"resuming from iter {progress['iter']} (best val loss {progress['best_val_loss']:.4f})")
    run.keep_metrics_until(progress["iter"])
    origin = info.get("init_from", "resume")
    return Start(model_config, tokenizer, params, opt_state, progress, origin)


def check_tokenizer(dataset: Dataset, tokenizer: Tokenizer, source) -> None:
    if tokenizer.describe() != dataset.tokenizer.describe():
        raise UserError(
            f"{source} uses a {tokenizer.describe()['kind']} tokenizer that differs from the "
            f"{dataset.tokenizer.describe()['kind']} vocabulary of {dataset.directory}"
        )


def note_model_shape(config: TrainConfig, model_config: GPTConfig, source, log) -> None:
    """The model flags apply to new models only; say so when they disagree with `source`."""
    differing = [
        f"{name}={getattr(model_config, name)}"
        for name in MODEL_SHAPE
        if getattr(config, name) != getattr(model_config, name)
    ]
    if differing:
        log(f"model shape from {source}: {', '.join(differing)} (the model flags do not apply)")
