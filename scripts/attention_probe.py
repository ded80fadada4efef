"""How long a decode step's attention takes each way `attend_filled` can read the cache: a
loop over the blocks the rows reached, one product over every block, or the native kernel
(each row's filled slots where they lie; "-" where it is not built).

    python scripts/attention_probe.py --batch_sizes=1,8 --cases=640:576,1024:300,256:140

A jitted program of the step's attention alone (gpt2's 12 layers, 12 heads of 64, one query
per row, a cache as the engine keeps it on a CPU: float32, or bfloat16 as its bits with
--cache=bfloat16): per batch size and case SLOTS:FILLED, ms per step (median of --repeats runs)
each way, with the CPU model, on stdout. Each layer has its own cache, as in the engine: at
batch 8 they do not fit in a CPU's last-level cache together, so each is read from memory. The
cache is only read here; in the engine's program the same step also writes it.
"""

import argparse
import statistics
from functools import partial

import jax
import jax.numpy as jnp

from nanogpt_jax.bench.hardware import call_seconds, cpu_name
from nanogpt_jax.engine import ATTEND_BLOCK
from nanogpt_jax.kernels import decode_attention
from nanogpt_jax.model import attend_every_block, attend_reached_blocks, from_cache, to_cache


def step_ms(attend, q, keys, values, per_row, repeats: int) -> float:
    """Median ms of one run of `attend(q, k, v, per_row)` over every layer's cache."""

    def step(q, keys, values, per_row):
        return jnp.stack([attend(q, k, v, per_row) for k, v in zip(keys, values, strict=True)])

    times = call_seconds(jax.jit(step), q, keys, values, per_row, repeats=repeats)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--cases", default="640:576,1024:300,1024:600,256:140")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cache", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    block, H, D = ATTEND_BLOCK, args.heads, args.head_dim
    print(
        f"{cpu_name()}; jax {jax.__version__}; blocks of {block} slots, {args.layers} layers, "
        f"a {args.cache} cache"
    )
    kernel = decode_attention.available()
    print(
        f"{'B':>3} {'slots':>6} {'filled':>7} {'blocks':>7} {'loop ms':>8} {'every ms':>9} "
        f"{'kernel ms':>10}"
    )
    for B in (int(b) for b in args.batch_sizes.split(",")):
        for case in args.cases.split(","):
            slots, filled = (int(n) for n in case.split(":"))
            slots = -(-slots // block) * block
            keys = jax.random.split(jax.random.key(0), 2 * args.layers + 1)
            cache = [jax.random.normal(key, (B * H, slots, D)) for key in keys[1:]]
            if args.cache == "bfloat16":  # stored as the engine stores it: its bits
                cache = [to_cache(t, jnp.zeros((), jnp.uint16)) for t in cache]
            q = jax.random.normal(keys[0], (B * H, 1, D))
            per_row = jnp.full((B * H,), filled, jnp.int32)
            reached = -(-filled // block)
            stored = (cache[: args.layers], cache[args.layers :])
            numbers = [[from_cache(t) for t in half] for half in stored]  # what XLA's ways read
            layers = (q, *numbers, per_row, args.repeats)
            loop = step_ms(partial(attend_reached_blocks, reached=reached, block=block), *layers)
            every = step_ms(partial(attend_every_block, block=block), *layers)
            as_stored = (q, *stored, per_row, args.repeats)  # the kernel reads the bits
            native = f"{step_ms(decode_attention.attend_filled, *as_stored):.2f}" if kernel else "-"
            print(
                f"{B:>3} {slots:>6} {filled:>7} {f'{reached}/{slots // block}':>7} "
                f"{loop:>8.2f} {every:>9.2f} {native:>10}",
                flush=True,
            )


if __name__ == "__main__":
    main()
