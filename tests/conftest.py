"""Shared fixtures: tiny random models in every supported on-disk format."""

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "shakespeare_char" / "input.txt"

# GPT-2's BPE ranks come from a local tiktoken cache: tests never download anything.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))


@pytest.fixture(autouse=True, scope="session")
def isolated_cache_home(tmp_path_factory):
    """Converted presets and compiled programs go to a temporary directory, not ~/.cache."""
    home = tmp_path_factory.mktemp("nanogpt_jax_home")
    os.environ["NANOGPT_JAX_HOME"] = str(home)
    yield home


def run_script(
    name: str, *args: str, timeout: float = 600, env: dict | None = None, cwd: Path = REPO
):
    """Run scripts/<name>.py in a fresh process (from `cwd`); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result, *fragments: str):
    """A failed command: non-zero exit, one `error:` line on stderr naming `fragments`."""
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# Weights drawn at GPT-2's init scale make a model whose greedy output repeats one or two
# tokens, so a decoder that feeds back the wrong token or writes the cache a slot off would
# still agree with its reference. Matrices and embeddings scaled up make outputs wander over
# many tokens (tests assert how many), and activations large enough that the choice of GELU
# shows in the logits. A vocabulary of a few hundred symbols needs a larger factor than
# GPT-2's 50257 to stop repeating; beyond these, float32 rounding grows with the activations.
SPREAD = 10.0  # GPT-2 vocabulary: 19-46 distinct greedy tokens in 60 (seed 0)
SMALL_VOCAB_SPREAD = 20.0  # 65-300 symbols: 11-27 distinct greedy tokens in 60


def spread_params(params, scale=SMALL_VOCAB_SPREAD):
    """A JAX parameter tree with its matrices and embeddings scaled by `scale`."""
    import jax

    return jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, params)


def spread_torch_(model, scale=SPREAD):
    """Scale a torch model's matrices and embeddings by `scale`, in place."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.mul_(scale)
    return model


def spread_model(config, seed=0, scale=SMALL_VOCAB_SPREAD):
    """This project's GPT with spread weights, and its parameter tree."""
    from flax import nnx

    from nanogpt_jax.checkpoint import params_of
    from nanogpt_jax.model import GPT

    model = GPT(config, rngs=nnx.Rngs(seed))
    params = spread_params(params_of(model), scale)
    nnx.update(model, params)
    return model, params


def distinct_new(tokens, prompt_length: int) -> int:
    """How many different tokens a row generated after its prompt."""
    return len(set(np.asarray(tokens)[prompt_length:].tolist()) - {-1})


def hf_gpt2(seed=0, **overrides):
    """A random Hugging Face GPT2LMHeadModel with a tiny config and spread weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=50257,
        activation_function="gelu_new",
    )
    config.update(overrides)
    return spread_torch_(GPT2LMHeadModel(GPT2Config(**config)).eval())


def write_hub_layout(model, directory: Path) -> Path:
    """What the hub's openai-community/gpt2 repos hold: keys without `transformer.`, the causal
    mask buffers `h.N.attn.bias` and `attn.masked_bias`, and the tied `lm_head.weight`."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(directory / "config.json")
    state = {}
    n_positions = model.config.n_positions
    for name, tensor in model.state_dict().items():
        state[name.removeprefix("transformer.")] = tensor.clone().contiguous()
    for i in range(model.config.n_layer):
        mask = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)
        state[f"h.{i}.attn.bias"] = mask
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    save_file(state, directory / "model.safetensors")
    return directory


# nanoGPT's train.py saves `config`: every int/float/bool/str setting at its top, here as
# config/train_shakespeare_char.py leaves them (the model's shape is filled in per run)
NANOGPT_TRAIN_CONFIG = dict(
    out_dir="out-shakespeare-char",
    eval_interval=250,
    log_interval=10,
    eval_iters=200,
    eval_only=False,
    always_save_checkpoint=False,
    init_from="scratch",
    wandb_log=False,
    wandb_project="shakespeare-char",
    wandb_run_name="mini-gpt",
    dataset="shakespeare_char",
    gradient_accumulation_steps=1,
    batch_size=64,
    learning_rate=1e-3,
    max_iters=5000,
    weight_decay=1e-1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,
    decay_lr=True,
    warmup_iters=100,
    lr_decay_iters=5000,
    min_lr=1e-4,
    backend="nccl",
    device="cuda",
    dtype="bfloat16",
    compile=True,
)


@dataclass
class NanoGPTRun:
    """A nanoGPT folder after `python data/shakespeare_char/prepare.py` and `python train.py
    config/train_shakespeare_char.py`: ROOT/out-shakespeare-char/ckpt.pt alone, the
    vocabulary in ROOT/data/shakespeare_char/meta.pkl (character models only)."""

    root: Path
    ckpt: Path
    meta: Path | None
    model: object  # the torch reference model the checkpoint holds

    @property
    def out_dir(self) -> Path:
        return self.ckpt.parent


def write_nanogpt_run(root: Path, config, chars=None, seed=0, compiled=True) -> NanoGPTRun:
    """A nanoGPT run laid out as nanoGPT leaves it, its ckpt.pt saved as nanoGPT's train.py
    saves it (keys prefixed with torch.compile's `_orig_mod.`, AdamW's state, the settings),
    from the torch reference model with spread weights; meta.pkl when `chars` is given."""
    import torch

    from nanogpt_jax.interop.export import nanogpt_model_args
    from nanogpt_jax.interop.torch_reference import GPT as TorchGPT
    from nanogpt_jax.tokenizer import write_meta_pkl

    torch.manual_seed(seed)
    model = TorchGPT(config).eval()
    spread_torch_(model, SMALL_VOCAB_SPREAD)
    with torch.no_grad():  # make biases and LayerNorms non-trivial so a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model_args = nanogpt_model_args(config)
    prefix = "_orig_mod." if compiled else ""
    checkpoint = {
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 250,
        "best_val_loss": torch.tensor(2.5),
        "config": {**NANOGPT_TRAIN_CONFIG, **model_args, "dropout": 0.2},
    }
    out_dir = root / NANOGPT_TRAIN_CONFIG["out_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out_dir / "ckpt.pt")
    meta = None
    if chars is not None:
        meta = root / "data" / NANOGPT_TRAIN_CONFIG["dataset"] / "meta.pkl"
        meta.parent.mkdir(parents=True, exist_ok=True)
        write_meta_pkl(meta, chars)
    return NanoGPTRun(root, out_dir / "ckpt.pt", meta, model)


@pytest.fixture(scope="session")
def shakespeare_chars():
    return sorted(set(SHAKESPEARE.read_text()))


@pytest.fixture(scope="session")
def nanogpt_char_run(tmp_path_factory, shakespeare_chars) -> NanoGPTRun:
    """A random char-level nanoGPT run (65 symbols, block_size 32) in nanoGPT's layout."""
    from nanogpt_jax.config import GPTConfig

    config = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, bias=False)
    # seed 2: greedy samples wander over 17-21 symbols in 40 (the parity tests assert > 10)
    root = tmp_path_factory.mktemp("nanogpt")
    return write_nanogpt_run(root, config, chars=shakespeare_chars, seed=2)


@pytest.fixture(scope="session")
def char_checkpoint(tmp_path_factory, nanogpt_char_run):
    """That run converted into a nanogpt-jax checkpoint directory."""
    from nanogpt_jax.checkpoint import save_model
    from nanogpt_jax.interop.convert import convert

    converted = convert(str(nanogpt_char_run.ckpt), meta=str(nanogpt_char_run.meta))
    directory = tmp_path_factory.mktemp("char_ckpt") / "model"
    return save_model(directory, converted.params, converted.config, converted.tokenizer)


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory):
    """A converted random GPT-2-vocabulary model (block_size 64) and its torch original."""
    from nanogpt_jax.checkpoint import save_model
    from nanogpt_jax.interop.convert import convert

    directory = tmp_path_factory.mktemp("gpt2_ckpt")
    model = hf_gpt2()
    model.save_pretrained(directory / "hf")
    converted = convert(str(directory / "hf"))
    path = save_model(directory / "model", converted.params, converted.config, converted.tokenizer)
    return path, model


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# Float32 logits of two implementations agree to ~1e-6 of the logit scale (spread weights,
# measured); exact vs tanh GELU moves them by ~3e-4 of it, thirty times this tolerance.
LOGIT_TOLERANCE = 1e-5


def relative_logit_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    return max_abs_diff(ours, reference) / float(np.max(np.abs(np.asarray(reference))))


def assert_logits_close(ours, reference, tolerance=LOGIT_TOLERANCE) -> float:
    error = relative_logit_error(ours, reference)
    assert error <= tolerance, f"logits differ by {error:.2e} of their scale"
    return error


def pickle_bytes(obj) -> bytes:
    return pickle.dumps(obj)
