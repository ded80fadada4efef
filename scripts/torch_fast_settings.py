"""Which way of running gpt-fast's decode step is fastest on this CPU: eager PyTorch, or
torch.compile under each Inductor setting of `TORCH_CPU_VARIANTS` in
`nanogpt_jax.bench.implementations`.

    python scripts/torch_fast_settings.py --model=gpt2 --batch_sizes=1,8 --new_tokens=64

Prints ms per decode step (median of --repeats runs after a warm-up) and compile seconds per
variant and batch size, with the CPU model; the benchmark races the faster of the variants in
`TORCH_CPU_CANDIDATES`, chosen again in every run.
"""

import argparse
import statistics
import sys
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="a shape: tiny, gpt2 ... gpt2-xl")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=None, help="comma list (default: all)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import jax
    import torch
    from flax import nnx

    from nanogpt_jax.bench.hardware import cpu_name
    from nanogpt_jax.bench.implementations import TORCH_CPU_VARIANTS, torch_model
    from nanogpt_jax.bench.run import SHAPES
    from nanogpt_jax.bench.torch_fast import StaticCacheDecoder
    from nanogpt_jax.checkpoint import params_of
    from nanogpt_jax.model import GPT

    config = SHAPES[args.model]
    params = jax.device_get(params_of(GPT(config, rngs=nnx.Rngs(0))))
    model = torch_model(config, params, "cpu", args.dtype)
    variants = args.variants.split(",") if args.variants else list(TORCH_CPU_VARIANTS)
    print(
        f"{args.model}, {args.dtype}, {cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens"
    )
    print(f"{'variant':>22} {'B':>3} {'ms/step':>8} {'compile s':>9}")
    rng = np.random.default_rng(0)
    for batch in map(int, args.batch_sizes.split(",")):
        prompts = rng.integers(0, config.vocab_size, (batch, args.prompt_len))
        for variant in variants:
            options = TORCH_CPU_VARIANTS[variant]
            decoder = StaticCacheDecoder(model, "cpu", config.vocab_size, options)
            try:
                decoder.generate(prompts, args.new_tokens)  # compiles
                decoder.generate(prompts, 1)
            except Exception as e:  # an Inductor setting this machine cannot build
                print(f"{variant:>22} {batch:>3} failed: {type(e).__name__}: {e}".splitlines()[0])
                continue

            full = median_seconds(decoder, prompts, args.new_tokens, args.repeats)
            first = median_seconds(decoder, prompts, 1, args.repeats)
            ms = 1e3 * (full - first) / (args.new_tokens - 1)
            print(f"{variant:>22} {batch:>3} {ms:8.2f} {decoder.compile_seconds:9.1f}", flush=True)


def median_seconds(decoder, prompts, num_new: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        decoder.generate(prompts, num_new)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
