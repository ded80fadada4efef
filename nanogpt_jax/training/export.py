"""Turn a training run into a shippable inference checkpoint, recording a val-loss figure that
anyone can recompute: the mean loss over the whole val split in fixed, non-overlapping windows
(unlike the random batches of training-time evaluation, it does not depend on a seed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanogpt_jax.bundle import ModelBundle, load
from nanogpt_jax.checkpoint import load_params, save_model
from nanogpt_jax.training.data import consecutive_windows, split_text
from nanogpt_jax.training.step import windowed_loss

VAL_LOSS_METHOD = (
    "mean cross-entropy over the last 10% of the text (nanoGPT's val split) in consecutive, "
    "non-overlapping block_size windows, float32"
)


def val_loss(bundle: ModelBundle, text: str) -> float:
    """The deterministic val loss of `bundle` on the val split of `text`."""
    tokens = np.asarray(bundle.tokenizer.encode(split_text(text)[1]), np.int32)
    inputs, targets = consecutive_windows(tokens, bundle.config.block_size)
    return windowed_loss(bundle.graphdef, bundle.params, inputs, targets)


def export_inference_checkpoint(
    out_dir: str | Path, destination: str | Path, text: str, info: dict
) -> dict:
    """Save out_dir's model (as `load(out_dir)` serves it) to `destination` in save_model's
    layout, with `info` plus its val loss on `text`. Returns the info written."""
    bundle = load(out_dir)
    info = {**bundle.info, **info}
    if "val_loss" in info:  # training's estimate from random batches, kept for reference
        info["estimated_val_loss"] = info.pop("val_loss")
    info["val_loss"] = round(val_loss(bundle, text), 4)
    info["val_loss_method"] = VAL_LOSS_METHOD
    params = load_params(out_dir, bundle.config)
    save_model(destination, params, bundle.config, bundle.tokenizer, info=info, overwrite=True)
    return info
