"""Thin entry point; see nanogpt_jax/commands/dtype_accuracy.py."""

from nanogpt_jax.commands.dtype_accuracy import entry_point

if __name__ == "__main__":
    entry_point()
