"""Load on a running nanogpt-serve (or any OpenAI-compatible completions server): a sweep of
concurrent clients and of Poisson arrival rates, with mixed prompt lengths.

Each request streams, so the client sees its first token arrive. Per level:
  requests_s, output_tok_s   answered requests and completion tokens per second of wall time
  ttft_p50/p99_s             from sending a request to its first piece of text
  itl_p50/p99_s              a request's mean time per token after its first:
                             (last piece - first piece) / (completion tokens - 1)
Prompts are random token ids of the lengths given, below the model's vocabulary size (which
/v1/models reports), so the same load fits any model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

from nanogpt_jax.checkpoint import write_text_atomic
from nanogpt_jax.extras import require


@dataclasses.dataclass(frozen=True)
class Load:
    url: str = "http://127.0.0.1:8000"
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    rates: tuple[float, ...] = ()  # Poisson arrivals, requests per second
    requests: int | None = None  # per level (default: 4 per client, at least 16)
    prompt_lens: tuple[int, ...] = (16, 64, 256)
    max_tokens: int = 64
    temperature: float = 0.8
    seed: int = 0
    timeout: float = 600.0


def requests_for(load: Load, count: int, vocab_size: int, max_len: int) -> list[dict]:
    """`count` completions requests: prompt lengths cycling through load.prompt_lens (cropped
    to fit max_len with the new tokens), each with its own seed."""
    rng = random.Random(load.seed)
    out = []
    for i in range(count):
        length = min(load.prompt_lens[i % len(load.prompt_lens)], max_len - load.max_tokens)
        prompt = [rng.randrange(vocab_size) for _ in range(max(length, 1))]
        out.append(
            dict(
                prompt=prompt,
                max_tokens=load.max_tokens,
                temperature=load.temperature,
                seed=load.seed * 100_003 + i,
            )
        )
    return out


async def timed_request(client, model: str, request: dict) -> dict:
    """One streamed request: when it was sent, its first and last pieces, its tokens."""
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.completions.create(
        model=model, stream=True, stream_options={"include_usage": True}, **request
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
    return dict(sent=sent, first=first, last=last, tokens=tokens)


def summary(records: list[dict], wall: float) -> dict:
    ttft = [r["first"] - r["sent"] for r in records if r["first"] is not None]
    itl = [
        (r["last"] - r["first"]) / (r["tokens"] - 1)
        for r in records
        if r["first"] is not None and r["tokens"] > 1
    ]
    tokens = sum(r["tokens"] for r in records)
    return dict(
        requests=len(records),
        wall_s=wall,
        requests_s=len(records) / wall,
        output_tok_s=tokens / wall,
        completion_tokens=tokens,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_s=percentile(itl, 50),
        itl_p99_s=percentile(itl, 99),
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def closed_loop(client, model: str, requests: list[dict], clients: int) -> dict:
    """`clients` clients, each sending its next request as soon as its last is answered."""
    queue = list(reversed(requests))
    records = []

    async def client_loop():
        while queue:
            records.append(await timed_request(client, model, queue.pop()))

    began = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return summary(records, time.perf_counter() - began)


async def poisson(client, model: str, requests: list[dict], rate: float, seed: int) -> dict:
    """Requests arriving at random, `rate` per second on average, whatever is in flight."""
    rng = random.Random(seed)
    began = time.perf_counter()
    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(timed_request(client, model, request)))
        await asyncio.sleep(rng.expovariate(rate))
    records = await asyncio.gather(*tasks)
    return summary(list(records), time.perf_counter() - began)


async def run_load(load: Load, log=print) -> dict:
    """Every level of the sweep against the server at load.url."""
    openai = require("openai", "the load benchmark")
    client = openai.AsyncOpenAI(
        base_url=f"{load.url}/v1", api_key="none", max_retries=0, timeout=load.timeout
    )
    card = (await client.models.list()).data[0]
    extra = card.model_extra or {}
    vocab_size, max_len = extra.get("vocab_size", 50257), extra.get("max_model_len", 1024)
    report = dict(load=dataclasses.asdict(load), model=card.id, levels=[])
    for clients in load.concurrency:
        count = load.requests or max(16, 4 * clients)
        requests = requests_for(load, count, vocab_size, max_len)
        log(f"{clients} concurrent clients, {count} requests")
        result = await closed_loop(client, card.id, requests, clients)
        report["levels"].append(dict(kind="concurrency", clients=clients) | result)
    for rate in load.rates:
        count = load.requests or 32
        requests = requests_for(load, count, vocab_size, max_len)
        log(f"Poisson arrivals at {rate}/s, {count} requests")
        result = await poisson(client, card.id, requests, rate, load.seed)
        report["levels"].append(dict(kind="poisson", rate=rate) | result)
    await client.close()
    return report


def offline_baseline(bundle, load: Load, count: int, vocab_size: int) -> dict:
    """The same requests as one `bundle.generate` batch, in this process: what continuous
    batching is measured against (compile excluded: a warm-up batch runs first)."""
    requests = requests_for(load, count, vocab_size, bundle.config.block_size)
    prompts = [r["prompt"] for r in requests]
    options = dict(max_new_tokens=load.max_tokens, temperature=load.temperature, seed=load.seed)
    bundle.generate(prompts, **options)
    began = time.perf_counter()
    result = bundle.generate(prompts, **options)
    wall = time.perf_counter() - began
    return dict(requests=count, wall_s=wall, output_tok_s=result.new_token_count / wall)


COLUMNS = (
    ("level", "{}"),
    ("requests_s", "{:.2f}"),
    ("output_tok_s", "{:.1f}"),
    ("ttft_p50_s", "{:.3f}"),
    ("ttft_p99_s", "{:.3f}"),
    ("itl_p50_s", "{:.4f}"),
    ("itl_p99_s", "{:.4f}"),
)


def format_table(report: dict) -> str:
    lines = [[name for name, _ in COLUMNS]]
    for level in report["levels"]:
        label = (
            f"{level['clients']} clients"
            if level["kind"] == "concurrency"
            else f"{level['rate']}/s Poisson"
        )
        row = dict(level, level=label)
        lines.append(["-" if row[c] is None else f.format(row[c]) for c, f in COLUMNS])
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def write_results(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "serve-results.json", json.dumps(report, indent=1) + "\n")


def write_plot(out_dir: Path, report: dict) -> None:
    """serve-load.png: output tokens/s and time to first token against concurrent clients."""
    require("matplotlib", "the load benchmark's plot").use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in report["levels"] if lv["kind"] == "concurrency"]
    if not levels:
        return
    clients = [lv["clients"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [lv["output_tok_s"] for lv in levels], marker="o")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s")
    right.plot(clients, [lv["ttft_p50_s"] for lv in levels], marker="o", label="p50")
    right.plot(clients, [lv["ttft_p99_s"] for lv in levels], marker="s", label="p99")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="time to first token (s)")
    right.legend()
    fig.suptitle(f"nanogpt-serve, {report['model']}")
    fig.tight_layout()
    fig.savefig(out_dir / "serve-load.png", dpi=120)
    plt.close(fig)
