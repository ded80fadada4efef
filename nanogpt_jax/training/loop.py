"""The training loop: nanoGPT's train.py as `train(TrainConfig) -> TrainResult`.

Every random choice derives from config.seed, each in its own stream:
    parameter init      fold_in(root, 0)
    dropout             fold_in(fold_in(fold_in(root, 1), iter), micro_step)
    training batches    numpy generator (seed, 0, iter)
    evaluation batches  numpy generator (seed, 1, split, iter)
so a run resumed from a checkpoint takes exactly the steps an uninterrupted run takes.

Iterations: step i (0-based) uses get_lr(i); after `iter` steps, whenever iter is a multiple of
eval_interval or equals max_iters, both splits are evaluated and a checkpoint is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nanogpt_jax.checkpoint import abstract_model, count_params, metadata, write_metadata
from nanogpt_jax.errors import UserError
from nanogpt_jax.training.config import TrainConfig
from nanogpt_jax.training.data import (
    EVAL_BATCHES,
    SPLITS,
    TRAIN_BATCHES,
    Dataset,
    batch_rng,
    open_dataset,
    sample_batch,
)
from nanogpt_jax.training.optim import learning_rate_schedule, make_optimizer
from nanogpt_jax.training.run_directory import RunDirectory
from nanogpt_jax.training.start import starting_point
from nanogpt_jax.training.step import flops_per_token, known_peak_flops, make_train_step, mean_loss

INIT_STREAM, DROPOUT_STREAM = 0, 1  # streams of the root key


def log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass
class TrainResult:
    iter_num: int  # optimizer steps taken in total
    losses: dict[int, float]  # training loss of each logged step
    evaluations: list[dict]  # the metrics.jsonl records of this call
    best_val_loss: float


def compute_dtype(config: TrainConfig):
    name = config.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return jnp.dtype(name)


def train(config: TrainConfig, log: Callable[[str], None] = log_to_stderr) -> TrainResult:
    """Train (or resume, or fine-tune) as `config` says, checkpointing into config.out_dir."""
    dataset = open_dataset(config.data_path, config.block_size)
    root = jax.random.key(config.seed)
    optimizer = make_optimizer(config)
    with wandb_reporter(config) as report, RunDirectory(config.out_dir) as run:
        init_key = jax.random.fold_in(root, INIT_STREAM)
        start = starting_point(config, dataset, run, optimizer, init_key, log)
        model_config, tokenizer, params = start.model_config, start.tokenizer, start.params
        graphdef = nnx.split(abstract_model(model_config, compute_dtype(config)))[0]
        opt_state = optimizer.init(params) if start.opt_state is None else start.opt_state
        iter_num = start.progress.get("iter", 0)
        best_val_loss = start.progress.get("best_val_loss", math.inf)
        elapsed_before = start.progress.get("elapsed_s", 0.0)
        began = time.perf_counter()
        result = TrainResult(iter_num, {}, [], best_val_loss)
        lr_at = learning_rate_schedule(config)
        num_params = count_params(params)
        log(
            f"parameters: {num_params / 1e6:.2f}M; tokens per iteration: {config.tokens_per_iter:,}"
        )

        def evaluate(mfu: float | None = None) -> dict:
            losses = {
                split: estimate_loss(graphdef, params, dataset, split, config, iter_num)
                for split in SPLITS
            }
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            record = dict(
                iter=iter_num,
                train_loss=losses["train"],
                val_loss=losses["val"],
                lr=float(lr_at(iter_num)),
                elapsed_s=round(elapsed_before + time.perf_counter() - began, 3),
            )
            result.evaluations.append(record)
            report(record, mfu)
            return record

        if config.eval_only:
            evaluate()
            return result
        if iter_num >= config.max_iters:
            log(f"nothing to do: {iter_num} iterations done, max_iters={config.max_iters}")
            return result
        if not start.progress:  # a new run: record the model before the first checkpoint
            write_metadata(
                run.out_dir, metadata(model_config, tokenizer, run_info(config, start.origin))
            )
            run.keep_metrics_until(-1)
            run.append_metrics(evaluate())

        batch = training_batch(dataset, config, iter_num)
        step = compile_train_step(optimizer, graphdef, params, opt_state, batch, root, log)
        flops_per_iter = flops_per_token(model_config, num_params) * config.tokens_per_iter
        timer = StepTimer(flops_per_iter, peak_flops(config, log))
        dropout_root = jax.random.fold_in(root, DROPOUT_STREAM)
        while iter_num < config.max_iters:
            key = jax.random.fold_in(dropout_root, iter_num)
            params, opt_state, metrics = step(params, opt_state, batch, key)
            step_index, iter_num = iter_num, iter_num + 1
            timer.steps += 1
            if iter_num < config.max_iters:  # sampled while the device computes
                batch = training_batch(dataset, config, iter_num)
            if step_index % config.log_interval == 0:
                loss = float(metrics.loss)  # waits for the step
                result.losses[step_index] = loss
                log(
                    f"iter {step_index}: loss {loss:.4f}, lr {float(lr_at(step_index)):.3e}, "
                    f"norm {float(metrics.grad_norm):.3f}, {timer.lap(config.tokens_per_iter)}"
                )
            if iter_num % config.eval_interval == 0 or iter_num == config.max_iters:
                record = evaluate(timer.running_mfu)
                run.append_metrics(record)
                improved = record["val_loss"] < best_val_loss
                best_val_loss = min(best_val_loss, record["val_loss"])
                progress = dict(
                    iter=iter_num,
                    val_loss=record["val_loss"],
                    best_val_loss=best_val_loss,
                    elapsed_s=record["elapsed_s"],
                    config=config.to_dict(),
                )
                run.save(iter_num, params, opt_state, progress)
                if improved and not config.always_save_checkpoint:
                    run.save_best_params(params)
                if improved or config.always_save_checkpoint:
                    info = run_info(
                        config, start.origin, iter=iter_num, val_loss=record["val_loss"]
                    )
                    write_metadata(run.out_dir, metadata(model_config, tokenizer, info))
                timer.restart()  # evaluation is not step time
        result.iter_num, result.best_val_loss = iter_num, best_val_loss
        return result


@contextlib.contextmanager
def wandb_reporter(config: TrainConfig):
    """report(record, mfu): each evaluation sent to Weights & Biases as nanoGPT's wandb_log
    sends it; a no-op unless config.wandb_log. wandb is imported only when asked for."""
    if not config.wandb_log:
        yield lambda record, mfu: None
        return
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs the wandb package: pip install wandb") from None
    wandb_run = wandb.init(
        project=config.wandb_project, name=config.wandb_run_name, config=config.to_dict()
    )

    def report(record: dict, mfu: float | None) -> None:
        values = {"iter": record["iter"], "train/loss": record["train_loss"]}
        values |= {"val/loss": record["val_loss"], "lr": record["lr"]}
        if mfu is not None:
            values["mfu"] = mfu * 100  # percent, as nanoGPT logs it
        wandb_run.log(values)

    try:
        yield report
    finally:
        wandb_run.finish()


class StepTimer:
    """Time per step between log lines, and nanoGPT's running MFU estimate."""

    def __init__(self, flops_per_iter: float, peak_flops: float | None):
        self.flops_per_iter, self.peak_flops = flops_per_iter, peak_flops
        self.running_mfu, self.laps = None, 0
        self.restart()

    def restart(self) -> None:
        self.started, self.steps = time.perf_counter(), 0

    def lap(self, tokens_per_iter: int) -> str:
        """Timings since the last lap, once the last step has finished."""
        dt = (time.perf_counter() - self.started) / max(self.steps, 1)
        self.laps += 1
        if self.peak_flops and self.laps > 5:  # nanoGPT lets the first few steps settle
            mfu = self.flops_per_iter / dt / self.peak_flops
            self.running_mfu = (
                mfu if self.running_mfu is None else 0.9 * self.running_mfu + 0.1 * mfu
            )
        self.restart()
        mfu_text = "n/a" if self.running_mfu is None else f"{self.running_mfu * 100:.2f}%"
        return f"time {dt * 1000:.2f}ms, {tokens_per_iter / dt:,.0f} tok/s, mfu {mfu_text}"


def run_info(config: TrainConfig, origin: str, **values) -> dict:
    return dict(dataset=config.dataset, init_from=origin, **values)


def training_batch(dataset: Dataset, config: TrainConfig, iter_num: int):
    rng = batch_rng(config.seed, TRAIN_BATCHES, iter_num)
    shape = (config.gradient_accumulation_steps, config.batch_size)
    return sample_batch(dataset.train, shape, config.block_size, rng)  # 2 x (A, B, T)


def estimate_loss(graphdef, params, dataset, split, config, iter_num) -> float:
    """nanoGPT's estimate_loss: mean loss of eval_iters random batches of `split`."""
    rng = batch_rng(config.seed, EVAL_BATCHES, SPLITS.index(split), iter_num)
    shape = (config.eval_iters, config.batch_size)
    inputs, targets = sample_batch(dataset.split(split), shape, config.block_size, rng)
    return mean_loss(graphdef, params, inputs, targets)


def compile_train_step(optimizer, graphdef, params, opt_state, batch, root, log):
    """Compile ahead of time, so that compilation is timed apart from the steps."""
    began = time.perf_counter()
    step = make_train_step(optimizer).lower(graphdef, params, opt_state, batch, root).compile()
    log(f"compiled the train step in {time.perf_counter() - began:.1f} s")
    return step


def peak_flops(config: TrainConfig, log) -> float | None:
    device = jax.devices()[0]
    peak = config.peak_flops or known_peak_flops(device.device_kind)
    if peak is None:
        log(f"mfu: peak FLOP/s of {device.device_kind!r} unknown; pass --peak_flops to report it")
    else:
        log(f"mfu: against {peak / 1e12:.0f} TFLOP/s peak ({device.device_kind})")
    return peak
