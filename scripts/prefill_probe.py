"""How fast prompts go through the model: alone, a bucket's prompts together, and a burst's
shortest prompts as one long prompt.

    python scripts/prefill_probe.py --init_from=random:gpt2 --burst=16x6,64x5,256x5

(the default burst: the first 16 requests of `bench_serve.py`'s prompts, 16, 64 and 256 tokens
in turn).

A server answering a burst of requests that arrive together (a closed loop of clients whose
rows finish in the same decode call) gives the median request its first token no sooner
than the shorter half of the burst has gone through the model. One prompt as long as those
prompts together does the same products at a rate no packing of them can beat by more than
its attention, so its prefill time bounds that wait from below. Per case: tokens, ms (median
of --repeats runs) and ms per token, with the CPU model, on stdout.
"""

import argparse
import statistics

import jax
import numpy as np

from nanogpt_jax.bench.hardware import call_seconds, cpu_name
from nanogpt_jax.commands import load_model
from nanogpt_jax.engine import engine_of
from nanogpt_jax.generate import padded


def prefill_ms(engine, lengths: list[int], bucket: int, repeats: int) -> float:
    """Median ms of one prefill call of random prompts of these lengths, padded to `bucket`."""
    rng = np.random.default_rng(0)
    args = padded([rng.integers(0, engine.vocab_size, n).tolist() for n in lengths], bucket)
    times = call_seconds(lambda: engine.prefill(*args).logits, repeats=repeats)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init_from", default="random:gpt2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--burst", default="16x6,64x5,256x5", help="LENGTHxCOUNT, ...")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    engine = engine_of(load_model(args.init_from, args.dtype))
    burst = sorted(
        int(length)
        for part in args.burst.split(",")
        for length, count in [part.split("x")]
        for _ in range(int(count))
    )
    median = len(burst) // 2  # the median first token: after this many prompts, or one more
    shortest = sum(burst[:median])
    cases = [(f"{n} alone", [n], n) for n in sorted(set(burst))]
    cases += [(f"4 x {burst[0]} together", [burst[0]] * 4, burst[0])]
    cases += [
        (f"{n} as one prompt (the {k} shortest)", [n], n)
        for k, n in ((median, shortest), (median + 1, shortest + burst[median]))
    ]
    print(f"{cpu_name()}; jax {jax.__version__}; {args.init_from}, {args.dtype}")
    after = f"the {median} or {median + 1} shortest prompts"
    print(f"burst {args.burst}: its median first token comes after {after}")
    print(f"{'case':>40} {'tokens':>7} {'ms':>8} {'ms/token':>9}")
    for name, lengths, bucket in cases:
        ms = prefill_ms(engine, lengths, bucket, args.repeats)
        print(f"{name:>40} {sum(lengths):>7} {ms:>8.1f} {ms / sum(lengths):>9.2f}", flush=True)


if __name__ == "__main__":
    main()
