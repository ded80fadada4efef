"""Thin entry point; see nanogpt_jax/commands/prepare.py."""

from nanogpt_jax.commands.prepare import entry_point

if __name__ == "__main__":
    entry_point()
