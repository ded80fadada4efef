"""The project's cache directory: converted presets and compiled programs live here."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """`$NANOGPT_JAX_HOME`, else `$XDG_CACHE_HOME/nanogpt_jax`, else `~/.cache/nanogpt_jax`."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanogpt_jax"
    return Path(os.environ.get("NANOGPT_JAX_HOME", default))
