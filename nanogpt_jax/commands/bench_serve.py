"""Load a running server: concurrent clients and Poisson arrivals, mixed prompt lengths.

python scripts/serve.py --init_from=random:gpt2 --slots=16 &
python scripts/bench_serve.py --concurrency=1,4,16,64 --rates=1,2 --offline=random:gpt2

The table goes to stdout; DIR/serve-results.json and serve-load.png hold everything. With
--offline, the same requests also run as one bundle.generate batch in this process (of
--offline_batch of them), the yardstick for continuous batching's cost.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

from nanogpt_jax.commands import load_model, run
from nanogpt_jax.errors import UserError
from nanogpt_jax.extras import require
from nanogpt_jax.flags import flag, number_list, parse_flags


@dataclass
class BenchServeFlags:
    url: str = flag("http://127.0.0.1:8000", "the server")
    concurrency: str = flag("1,4,16,64", "comma list of concurrent clients, one level each")
    rates: str = flag("", "comma list of Poisson arrival rates (requests/s), one level each")
    requests: int | None = flag(None, "requests per level (default: 4 per client, >= 16)")
    prompt_lens: str = flag("16,64,256", "prompt lengths in tokens, cycled through")
    max_tokens: int = flag(64, "completion tokens per request")
    temperature: float = flag(0.8, "of every request")
    seed: int = flag(0, "prompts and request seeds")
    offline: str | None = flag(None, "the served model (e.g. random:gpt2): also time generate")
    offline_batch: int = flag(16, "requests in the offline generate batch")
    dtype: str = flag("float32", "the offline model's dtype")
    out: str = flag("bench-serve-out", "directory for serve-results.json and serve-load.png")


def main(argv: list[str]) -> None:
    from nanogpt_jax.bench import serve_load

    flags = parse_flags(BenchServeFlags, argv, usage="usage: python scripts/bench_serve.py")
    load = serve_load.Load(
        url=flags.url.rstrip("/"),
        concurrency=number_list("concurrency", flags.concurrency, blanks=True),
        rates=number_list("rates", flags.rates, float, blanks=True),
        requests=flags.requests,
        prompt_lens=number_list("prompt_lens", flags.prompt_lens, blanks=True),
        max_tokens=flags.max_tokens,
        temperature=flags.temperature,
        seed=flags.seed,
    )
    if not load.concurrency and not load.rates:
        raise UserError("nothing to run: give --concurrency or --rates")
    openai = require("openai", "the load benchmark")
    try:
        report = asyncio.run(serve_load.run_load(load, log=lambda m: print(m, file=sys.stderr)))
    except openai.APIConnectionError:
        raise UserError(
            f"no server answers at {load.url} (start one with scripts/serve.py)"
        ) from None
    if flags.offline:
        from nanogpt_jax.bench.hardware import cpu_name

        print(f"offline: {flags.offline}, one generate batch", file=sys.stderr)
        bundle = load_model(flags.offline, flags.dtype)
        report["offline"] = serve_load.offline_baseline(
            bundle, load, flags.offline_batch, bundle.tokenizer.vocab_size
        )
        report["cpu"] = cpu_name()
    out = Path(flags.out)
    serve_load.write_results(out, report)
    print(f"{report['model']}, {load.max_tokens} tokens per request, prompts {flags.prompt_lens}")
    print(serve_load.format_table(report))
    if "offline" in report:
        print(
            f"offline generate, one batch of {flags.offline_batch}: "
            f"{report['offline']['output_tok_s']:.1f} tok/s"
        )
    try:
        serve_load.write_plot(out, report)
    except UserError as e:
        print(f"note: no serve-load.png: {e}", file=sys.stderr)


def entry_point() -> None:
    run(main)


if __name__ == "__main__":
    entry_point()
