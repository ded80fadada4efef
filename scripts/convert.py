"""Thin entry point; see nanogpt_jax/commands/convert.py (also installed as nanogpt-convert)."""

from nanogpt_jax.commands.convert import entry_point

if __name__ == "__main__":
    entry_point()
