"""Train a GPT: nanoGPT's train.py flags and config files, on one JAX device.

python scripts/train.py configs/train_shakespeare_char.py
python scripts/train.py configs/train_shakespeare_char.py --device=cpu --max_iters=2000
python scripts/train.py configs/train_shakespeare_char.py --init_from=resume
"""

from __future__ import annotations

from nanogpt_jax.commands import run, select_platform
from nanogpt_jax.flags import parse_flags
from nanogpt_jax.training.config import TrainConfig

USAGE = "usage: python scripts/train.py [config files] [--key=value ...]"


def main(argv: list[str]) -> None:
    config = parse_flags(TrainConfig, argv, config_files=True, usage=USAGE)
    select_platform(config.device)
    from nanogpt_jax.engine import enable_persistent_compilation_cache
    from nanogpt_jax.training.loop import train

    # a resumed run finds its train step compiled already
    enable_persistent_compilation_cache()

    result = train(config)
    print(
        f"done: {result.iter_num} iterations, best val loss {result.best_val_loss:.4f}, "
        f"out_dir {config.out_dir}"
    )


def entry_point() -> None:
    run(main)


if __name__ == "__main__":
    entry_point()
