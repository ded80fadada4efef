"""Thin entry point; see nanogpt_jax/commands/serve.py (also installed as nanogpt-serve)."""

from nanogpt_jax.commands.serve import entry_point

if __name__ == "__main__":
    entry_point()
