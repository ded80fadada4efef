"""GPTConfig: nanoGPT's model hyperparameters, GPT-2 presets, and type-checked overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nanogpt_jax.errors import UserError

# Hugging Face's names for GPT-2's activation. OpenAI's GPT-2 used the tanh approximation
# ("gelu_new"); nanoGPT trains with PyTorch's exact erf GELU ("gelu").
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_fast": "gelu_new",
}


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, as nanoGPT does
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms; False is a bit better and faster
    activation_function: str = "gelu"  # "gelu" (exact, nanoGPT) or "gelu_new" (tanh, GPT-2)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise UserError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"config: dropout must be in [0, 1), got {self.dropout}")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"config: activation_function {self.activation_function!r} is not one of "
                f"{sorted(ACTIVATIONS)}"
            )
        object.__setattr__(self, "activation_function", ACTIVATIONS[self.activation_function])

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """Build from a dict (a JSON file, nanoGPT's model_args), rejecting unknown keys."""
        return cls(**checked_fields(cls, values, what="config"))

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **checked_fields(type(self), changes, what="config"))


PRESETS: dict[str, GPTConfig] = {
    name: GPTConfig(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=50257,
        block_size=1024,
        bias=True,
        activation_function="gelu_new",
    )
    for name, (n_layer, n_head, n_embd) in {
        "gpt2": (12, 12, 768),  # 124M params
        "gpt2-medium": (24, 16, 1024),  # 350M
        "gpt2-large": (36, 20, 1280),  # 774M
        "gpt2-xl": (48, 25, 1600),  # 1558M
    }.items()
}


def checked_fields(cls, values: dict[str, Any], *, what: str) -> dict[str, Any]:
    """Check that `values` names fields of dataclass `cls` with values of the declared types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{what}: unknown key {key!r} (known: {', '.join(fields)})")
        checked[key] = coerce(value, fields[key].type, f"{what}: {key}")
    return checked


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def coerce(value: Any, annotation: str | type, where: str) -> Any:
    """Return `value` as the annotated type (`int`, `float`, `bool`, `str`, or `X | None`).

    Ints are accepted for floats (`--temperature=1`), nothing else is converted.
    """
    annotation = annotation if isinstance(annotation, str) else annotation.__name__
    options = [part.strip() for part in annotation.split("|")]
    if value is None:
        if "None" in options:
            return None
        raise UserError(f"{where}: None is not allowed, expected {annotation}")
    for option in options:
        expected = _TYPES.get(option)
        if expected is None:
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if expected is int and isinstance(value, bool):
            continue
        if isinstance(value, expected):
            return value
    raise UserError(f"{where}: expected {annotation}, got {value!r}")
