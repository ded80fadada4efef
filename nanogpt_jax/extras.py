"""Optional dependencies, imported where they are needed: a missing one is a one-line error
naming the extra that installs it, not a ModuleNotFoundError traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from nanogpt_jax.errors import UserError

EXTRAS = {  # top-level module -> the pyproject extra that installs it
    "torch": "convert",
    "safetensors": "convert",
    "huggingface_hub": "convert",
    "transformers": "bench",
    "matplotlib": "bench",
    "tqdm": "bench",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "httpx": "serve",
    "openai": "serve",
}


def require(module: str, purpose: str) -> ModuleType:
    """`import module`, or UserError("{purpose} needs {module}: pip install ...")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        extra = EXTRAS[top]
        raise UserError(f"{purpose} needs {top}: pip install 'nanogpt-jax[{extra}]'") from None
