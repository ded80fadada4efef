"""Thin entry point; see nanogpt_jax/commands/train.py (also installed as nanogpt-train)."""

from nanogpt_jax.commands.train import entry_point

if __name__ == "__main__":
    entry_point()
