"""Thin entry point; see nanogpt_jax/commands/bench_serve.py (installed: nanogpt-bench-serve)."""

from nanogpt_jax.commands.bench_serve import entry_point

if __name__ == "__main__":
    entry_point()
