"""Thin entry point; see nanogpt_jax/commands/bench.py (also installed as nanogpt-bench)."""

from nanogpt_jax.commands.bench import entry_point

if __name__ == "__main__":
    entry_point()
