"""Thin entry point; see nanogpt_jax/commands/prepare.py."""

from nanogpt_jax.commands.prepare import bpe_entry_point

if __name__ == "__main__":
    bpe_entry_point()
