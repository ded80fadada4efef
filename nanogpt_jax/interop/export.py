"""A model as PyTorch files again, so that what was trained or converted here runs in nanoGPT
or Hugging Face `transformers`:

    nanogpt   DIR/ckpt.pt laid out as nanoGPT's train.py saves it (model, model_args, iter_num,
              best_val_loss, config), and DIR/meta.pkl for a character vocabulary
    hf        DIR/config.json and DIR/model.safetensors (`GPT2LMHeadModel.save_pretrained`)

The directory is written beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax

from nanogpt_jax.checkpoint import refuse_existing, replacing
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.extras import require
from nanogpt_jax.tokenizer import CharTokenizer, Tokenizer, write_meta_pkl

FORMATS = ("nanogpt", "hf")


def export_model(source: str, destination: str | Path, to: str, overwrite: bool = False) -> Path:
    """Write the model `source` names (anything `nanogpt_jax.load` takes) as `to` files."""
    from nanogpt_jax.bundle import read_model, resolve

    if to not in FORMATS:
        raise UserError(f"export format must be one of {', '.join(FORMATS)}, got {to!r}")
    destination = Path(destination).absolute()
    refuse_existing(destination, overwrite)
    config, tokenizer, params, info = read_model(resolve(str(source)))
    if to == "hf" and isinstance(tokenizer, CharTokenizer):
        raise UserError(
            "a character-level model has no Hugging Face tokenizer; export it with --to=nanogpt"
        )
    params = jax.device_get(params)
    with replacing(destination) as staging:
        staging.mkdir()
        write = write_nanogpt if to == "nanogpt" else write_hf
        write(staging, config, tokenizer, params, info)
    return destination


def write_nanogpt(directory: Path, config: GPTConfig, tokenizer: Tokenizer, params, info):
    """ckpt.pt (+ meta.pkl) that nanoGPT's sample.py and train.py (init_from=resume) load."""
    torch = require("torch", "writing nanoGPT's ckpt.pt")
    from nanogpt_jax.interop.torch_reference import state_dict_from_params

    if config.activation_function != "gelu":
        print(
            f"note: nanoGPT computes the exact GELU; this model was made with "
            f"{config.activation_function} (nanoGPT's from_pretrained makes the same swap)",
            file=sys.stderr,
        )
    model_args = nanogpt_model_args(config)
    checkpoint = {
        "model": state_dict_from_params(params),
        "model_args": model_args,
        "iter_num": int(info.get("iter", 0)),
        "best_val_loss": float(info.get("val_loss", math.inf)),
        # nanoGPT's sample.py reads data/<dataset>/meta.pkl for a character vocabulary
        "config": {**model_args, "dataset": info.get("dataset", "")},
    }
    torch.save(checkpoint, directory / "ckpt.pt")
    if isinstance(tokenizer, CharTokenizer):
        write_meta_pkl(directory / "meta.pkl", tokenizer.itos)


def nanogpt_model_args(config: GPTConfig) -> dict:
    """The `model_args` a nanoGPT ckpt.pt holds: its GPTConfig's fields."""
    return dict(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        block_size=config.block_size,
        bias=config.bias,
        vocab_size=config.vocab_size,
        dropout=0.0,
    )


def write_hf(directory: Path, config: GPTConfig, tokenizer: Tokenizer, params, info):
    """A GPT-2 directory for `GPT2LMHeadModel.from_pretrained`, nanoGPT's padding rows of the
    vocabulary dropped; GPT-2's tokenizer is `GPT2TokenizerFast.from_pretrained("gpt2")`."""
    for module in ("torch", "transformers", "safetensors"):
        require(module, "writing a Hugging Face directory")
    from nanogpt_jax.interop.hf_model import to_hf

    model = to_hf(config, params, vocab_size=tokenizer.vocab_size)
    for settings in (model.config, model.generation_config):
        settings.bos_token_id = settings.eos_token_id = tokenizer.eot_id
        settings.pad_token_id = None
    model.save_pretrained(directory)
