"""Thin entry point; see nanogpt_jax/commands/sample.py (also installed as nanogpt-sample)."""

from nanogpt_jax.commands.sample import entry_point

if __name__ == "__main__":
    entry_point()
