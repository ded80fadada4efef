"""nanoGPT's GPT-2 in JAX/Flax NNX: load PyTorch GPT-2 / nanoGPT checkpoints and sample fast."""

from nanogpt_jax.bundle import ModelBundle, load
from nanogpt_jax.config import PRESETS, GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.model import GPT

__all__ = ["GPT", "GPTConfig", "ModelBundle", "PRESETS", "UserError", "load"]
__version__ = "0.1.0"
