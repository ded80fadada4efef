"""How long a decode step's weight products take alone, with the native kernel and with XLA's
library products, on this machine.

    python scripts/products_probe.py --dtypes=float32,bfloat16 --batch_sizes=1,8 --rounds=3

gpt2's 49 weight products (random weights, in the given dtype) chained in a 16-step scan as
`bench.bound` times them, one token a row: with the kernel where `kernels.rows_times.applies`
sends the rows to it, and with NANOGPT_JAX_KERNELS=0. The two alternate --rounds times (this
project's machines share their memory bandwidth with neighbours); ms per step of each round
and the medians, with the CPU model, on stdout. `applies`' row limits rest on this probe.
"""

import argparse
import os
import statistics

import jax

from nanogpt_jax.bench.bound import xla_seconds
from nanogpt_jax.bench.hardware import cpu_name
from nanogpt_jax.bench.run import random_bundle
from nanogpt_jax.kernels import rows_times


def products_ms(params, batch: int, kernel: bool) -> float:
    """ms a step of the products alone, traced with the kernel allowed or not."""
    os.environ["NANOGPT_JAX_KERNELS"] = "1" if kernel else "0"
    return 1e3 * xla_seconds(params, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="a random shape: tiny, gpt2 ... gpt2-xl")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch_sizes", default="1,2,8,16,32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not rows_times.built():
        raise SystemExit("error: the rows_times kernel cannot be built on this machine")
    print(f"{cpu_name()}; jax {jax.__version__}; {args.model}, ms a step of its weight products")
    print(
        f"{'dtype':>9} {'B':>3} {'XLA (each round)':>24} {'kernel (each round)':>24} "
        f"{'XLA':>7} {'kernel':>7} {'XLA/kernel':>10}"
    )
    for dtype in args.dtypes.split(","):
        params = random_bundle(args.model, dtype).params
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            runs = {False: [], True: []}
            for _ in range(args.rounds):
                for kernel in (False, True):
                    runs[kernel].append(products_ms(params, batch, kernel))
            xla, native_ms = (statistics.median(runs[k]) for k in (False, True))
            each = {k: " ".join(f"{ms:.2f}" for ms in runs[k]) for k in runs}
            print(
                f"{dtype:>9} {batch:>3} {each[False]:>24} {each[True]:>24} "
                f"{xla:>7.2f} {native_ms:>7.2f} {xla / native_ms:>9.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
