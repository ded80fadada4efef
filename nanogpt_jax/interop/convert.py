"""PyTorch GPT-2 weights (Hugging Face or nanoGPT) to this project's Flax parameter tree.

Sources:
  - a preset name (gpt2 ... gpt2-xl): `model.safetensors` from the Hugging Face hub;
  - a Hugging Face GPT-2 directory: `config.json` plus `model.safetensors` or `pytorch_model.bin`;
  - a nanoGPT `ckpt.pt`: `model_args` gives the config, a `meta.pkl` the char vocabulary.

Both layouts use GPT-2's names, so conversion is one table: strip the prefixes, drop buffers,
and transpose Hugging Face's `Conv1D` weights, stored (in, out), into this model's (out, in)
layout, which nanoGPT's `nn.Linear` weights already have. Shapes cannot catch a wrong transpose
of a square matrix, so tests compare logits against PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from nanogpt_jax.checkpoint import abstract_model
from nanogpt_jax.config import PRESETS, GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.extras import require
from nanogpt_jax.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

HUB_REPOS = {name: f"openai-community/{name}" for name in PRESETS}

# Tensors that are not parameters: causal-mask buffers of older Hugging Face checkpoints.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
PREFIXES = ("_orig_mod.", "module.", "transformer.")

# this project's leaf name -> PyTorch's, for the last component of a path
LEAF_NAMES = {"weight": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
LINEARS = ("c_attn", "c_proj", "c_fc")


@dataclass
class Converted:
    config: GPTConfig
    tokenizer: Tokenizer
    params: dict  # GPT's parameter tree, float32 numpy arrays
    source: str
    vocabulary: str = ""  # for a nanoGPT ckpt.pt: which meta.pkl (or BPE) was used


def convert(source: str, meta: str | None = None) -> Converted:
    """Read any supported source into a config, tokenizer and Flax parameter tree."""
    if source in PRESETS:
        path = download_from_hub(source)
        return from_state_dict(
            read_tensors(path),
            PRESETS[source],
            GPT2Tokenizer(),
            linear_layout="conv1d",
            source=f"hf:{HUB_REPOS[source]}",
        )
    path = Path(source)
    if not path.exists():
        known = ", ".join(PRESETS)
        raise UserError(f"{source}: no such file or directory, and not a preset ({known})")
    if path.is_dir():
        return from_hf_directory(path)
    if path.suffix in (".safetensors", ".bin"):
        return from_hf_directory(path.parent, weights=path)
    return from_nanogpt_checkpoint(path, meta)


def download_from_hub(name: str) -> Path:
    hub = require("huggingface_hub", f"downloading {name}")
    try:
        return Path(hub.hf_hub_download(HUB_REPOS[name], "model.safetensors"))
    except Exception as e:
        raise UserError(
            f"cannot download {HUB_REPOS[name]} from the Hugging Face hub "
            f"({type(e).__name__}; offline?); a local copy, a Hugging Face GPT-2 directory, "
            "loads as it is"
        ) from None


def from_hf_directory(directory: Path, weights: Path | None = None) -> Converted:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory}: no config.json (not a Hugging Face GPT-2 directory)")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    config = config_from_hf(hf, config_path)
    if weights is None:
        candidates = [directory / "model.safetensors", directory / "pytorch_model.bin"]
        weights = next((p for p in candidates if p.is_file()), None)
        if weights is None:
            raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin")
    tokenizer = GPT2Tokenizer() if config.vocab_size >= GPT2Tokenizer.vocab_size else None
    if tokenizer is None:
        raise UserError(
            f"{config_path}: vocab_size {config.vocab_size} is smaller than GPT-2's BPE; "
            "only GPT-2-vocabulary Hugging Face models are supported"
        )
    return from_state_dict(
        read_tensors(weights), config, tokenizer, linear_layout="conv1d", source=str(directory)
    )


def config_from_hf(hf: dict, where: Path) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT2Config dict; refuses variants this model lacks."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where}: model_type {hf.get('model_type')!r} is not gpt2")
    unsupported = {
        "layer_norm_epsilon": (1e-5, hf.get("layer_norm_epsilon", 1e-5)),
        "scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": (
            False,
            hf.get("scale_attn_by_inverse_layer_idx", False),
        ),
        "reorder_and_upcast_attn": (False, hf.get("reorder_and_upcast_attn", False)),
        "n_inner": (None, hf.get("n_inner")),
    }
    for key, (expected, got) in unsupported.items():
        if got != expected and not (key == "n_inner" and got == 4 * hf.get("n_embd", 768)):
            raise UserError(f"{where}: {key}={got!r} is not supported (expected {expected!r})")
    try:
        return GPTConfig(
            block_size=int(hf["n_positions"]),
            vocab_size=int(hf["vocab_size"]),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            bias=True,
            activation_function=hf.get("activation_function", "gelu_new"),
        )
    except KeyError as e:
        raise UserError(f"{where}: missing {e.args[0]}") from None


def from_nanogpt_checkpoint(path: Path, meta: str | None) -> Converted:
    checkpoint = torch_load(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UserError(f"{path}: not a nanoGPT ckpt.pt (expected a dict with 'model')")
    model_args = dict(checkpoint.get("model_args") or {})
    if not model_args:
        raise UserError(f"{path}: nanoGPT checkpoint without model_args")
    model_args.pop("dropout", None)  # a training setting; inference never drops out
    config = GPTConfig.from_dict({**model_args, "activation_function": "gelu"})

    tokenizer, vocabulary = nanogpt_vocabulary(path, checkpoint, config, meta)
    state_dict = {k: to_numpy(v) for k, v in checkpoint["model"].items()}
    converted = from_state_dict(
        state_dict, config, tokenizer, linear_layout="linear", source=str(path)
    )
    converted.vocabulary = vocabulary
    return converted


def nanogpt_vocabulary(
    path: Path, checkpoint: dict, config: GPTConfig, meta: str | None
) -> tuple[Tokenizer, str]:
    """A ckpt.pt's tokenizer, found where nanoGPT's sample.py finds it: data/<dataset>/meta.pkl
    from the working directory (`dataset` from the checkpoint's config), then a meta.pkl beside
    ckpt.pt; `meta` names the file instead. Without one, GPT-2's BPE, as in nanoGPT.
    Returns the tokenizer and a line saying which vocabulary it is."""
    if meta:
        candidates = [Path(meta)]
        if not candidates[0].is_file():
            raise UserError(f"--meta: no such file {meta}")
    else:
        candidates = []
        dataset = (checkpoint.get("config") or {}).get("dataset")
        if isinstance(dataset, str) and dataset and Path(dataset).name == dataset:
            candidates.append(Path("data") / dataset / "meta.pkl")
        candidates.append(path.parent / "meta.pkl")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        if config.vocab_size < GPT2Tokenizer.vocab_size:
            looked = " and ".join(str(c.absolute()) for c in candidates)
            raise UserError(
                f"{path}: a {config.vocab_size}-token model needs its nanoGPT meta.pkl; looked "
                f"for {looked}; pass --meta=PATH"
            )
        return GPT2Tokenizer(), "GPT-2 BPE (no meta.pkl at " + ", ".join(map(str, candidates)) + ")"
    tokenizer = CharTokenizer.from_meta_pkl(found)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{found}: {tokenizer.vocab_size} characters but the model has only "
            f"{config.vocab_size} embeddings"
        )
    return tokenizer, f"{found} ({tokenizer.vocab_size} characters)"


def torch_load(path: Path):
    torch = require("torch", f"reading {path.name}")
    try:
        # weights_only: never unpickle arbitrary objects from a file we did not write
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as e:  # torch raises many types for a file it cannot parse
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({first_line})") from None


def to_numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().float().numpy()


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Name -> float32 array, from a .safetensors file (no torch needed) or a torch .bin."""
    if path.suffix == ".safetensors":
        load_file = require("safetensors.numpy", f"reading {path.name}").load_file
        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    state_dict = torch_load(path)
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: expected a state dict")
    return {k: to_numpy(v) for k, v in state_dict.items()}


def canonical_names(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip wrapper prefixes (torch.compile's `_orig_mod.`, DDP's `module.`, `transformer.`)
    and drop attention-mask buffers and the tied lm_head (after checking it is tied)."""
    out = {}
    lm_head = None
    for name, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        if name.endswith(BUFFER_SUFFIXES):
            continue
        if name == "lm_head.weight":
            lm_head = value
            continue
        out[name] = value
    if (
        lm_head is not None
        and "wte.weight" in out
        and not np.array_equal(lm_head, out["wte.weight"])
    ):
        raise UserError("lm_head.weight differs from wte.weight: untied heads are not supported")
    return out


def is_linear_weight(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def torch_name(path: tuple) -> str:
    """('h', 0, 'attn', 'c_attn', 'kernel') -> 'h.0.attn.c_attn.weight'."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, LEAF_NAMES[leaf]])


def from_state_dict(
    state_dict: dict[str, np.ndarray],
    config: GPTConfig,
    tokenizer: Tokenizer,
    *,
    linear_layout: str,
    source: str,
) -> Converted:
    """Fill GPT's parameter skeleton from PyTorch tensors, name by name.

    linear_layout: "conv1d" (Hugging Face, weights stored (in, out)) or "linear" (nanoGPT's
    nn.Linear, stored (out, in) like this model).
    """
    tensors = canonical_names(state_dict)
    skeleton = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))

    def path_names(path):
        return torch_name(tuple(getattr(k, "key", k) for k in path))

    expected = {
        path_names(path): target.shape
        for path, target in jax.tree_util.tree_leaves_with_path(skeleton)
    }
    converted = {}
    for name in sorted(tensors):  # name by name; the error names the first that does not fit
        value = tensors[name]
        if name not in expected:
            raise UserError(f"checkpoint tensor {name} has no place in this config")
        if linear_layout == "conv1d" and is_linear_weight(name):
            value = value.T
        if value.shape != expected[name]:
            raise UserError(
                f"shape mismatch for {name}: checkpoint {tuple(value.shape)}, "
                f"model config expects {tuple(expected[name])}"
            )
        converted[name] = np.ascontiguousarray(value, dtype=np.float32)
    missing = [name for name in expected if name not in converted]
    if missing:
        raise UserError(f"checkpoint has no tensor {missing[0]} (needed by this config)")
    params = jax.tree_util.tree_map_with_path(lambda path, _: converted[path_names(path)], skeleton)
    return Converted(config, tokenizer, params, source)
