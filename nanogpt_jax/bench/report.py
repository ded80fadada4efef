"""The benchmark's outputs: results.json, results.csv, throughput.png and a table for stdout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from nanogpt_jax.checkpoint import write_text_atomic
from nanogpt_jax.extras import require

COLUMNS = (
    "impl",
    "variant",
    "sampling",
    "devices",
    "batch_size",
    "prompt_len",
    "new_tokens",
    "tok_s",
    "tok_s_best",
    "decode_tok_s",
    "ms_per_token",
    "ttft_s",
    "compile_s",
    "total_s",
    "total_s_min",
    "warmup_s",
    "repeats",
    "peak_mem_gb",
    "read_gbs",
    "floor_ms_per_token",
    "fraction_of_floor",
    "bound_ms_per_token",
    "fraction_of_bound",
    "agree",
    "agree_steps",
    "valid_ids",
    "best_pytorch",
    "jax_over_best_pytorch",
    "skipped",
    "error",
    "load_avg",
    "scaling_efficiency",
    "ops_per_step",
    "busy_ms_per_step",
)

# (heading, column, format) of the printed table
TABLE = (
    ("impl", "label", "{}"),
    ("draw", "sampling", "{}"),
    ("B", "batch_size", "{}"),
    ("P", "prompt_len", "{}"),
    ("N", "new_tokens", "{}"),
    ("tok/s", "tok_s", "{:.1f}"),
    ("decode tok/s", "decode_tok_s", "{:.1f}"),
    ("ms/step", "ms_per_token", "{:.2f}"),
    ("ttft s", "ttft_s", "{:.3f}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("read GB/s", "read_gbs", "{:.1f}"),
    ("floor ms", "floor_ms_per_token", "{:.2f}"),
    ("of floor", "fraction_of_floor", "{:.0%}"),
    ("peak GB", "peak_mem_gb", "{:.3f}"),
    ("agree", "agree", "{}"),
    ("jax/best", "jax_over_best_pytorch", "{:.2f}x"),
)
# columns printed only when some row has them: a mesh run's, a profiled run's
OPTIONAL = (
    ("bound ms", "bound_ms_per_token", "{:.2f}"),
    ("of bound", "fraction_of_bound", "{:.0%}"),
    ("scaling", "scaling_efficiency", "{:.0%}"),
    ("ops/step", "ops_per_step", "{:.0f}"),
    ("busy ms", "busy_ms_per_step", "{:.2f}"),
)


def cell_of(row: dict) -> tuple:
    return (row.get("sampling"), row["batch_size"], row["prompt_len"], row["new_tokens"])


def with_headline(rows: list[dict], headline: list[dict]) -> list[dict]:
    """The rows, each jax row carrying its cell's ratio to the fastest PyTorch row."""
    by_cell = {cell_of(h): h for h in headline}
    out = []
    for row in rows:
        h = by_cell.get(cell_of(row)) if row["impl"] == "jax" else None
        extra = (
            dict(best_pytorch=h["best_pytorch"], jax_over_best_pytorch=h["jax_over_best_pytorch"])
            if h
            else {}
        )
        label = row["impl"] + (f" ({row['variant']})" if row.get("variant") else "")
        out.append(row | extra | {"label": label})
    return out


def write_results(out_dir: Path, report: dict) -> None:
    """results.json (everything) and results.csv (the rows), rewritten after every row."""
    write_text_atomic(out_dir / "results.json", json.dumps(report, indent=1) + "\n")
    rows = with_headline(report["results"], report.get("headline", []))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})


def format_table(rows: list[dict], headline: list[dict] = ()) -> str:
    """Rows as an aligned text table; skipped and failed runs say why."""
    rows = with_headline(rows, list(headline))
    present = [c for c in OPTIONAL if any(row.get(c[1]) is not None for row in rows)]
    table = (*TABLE, *present)
    lines = [[heading for heading, _, _ in table]]
    for row in rows:
        why = ("skipped", row["skipped"]) if row.get("skipped") else ("error", row.get("error"))
        if why[1]:
            cells = [str(row.get(column, "")) for _, column, _ in table[:5]]
            lines.append([*cells, f"{why[0]}: {why[1]}"])
            continue
        lines.append(
            [
                "-" if row.get(column) is None else fmt.format(row[column])
                for _, column, fmt in table
            ]
        )
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(table))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=False)).rstrip()
        for line in lines  # a skipped row has fewer cells
    )


def write_plot(out_dir: Path, report: dict) -> None:
    """throughput.png: tokens/s against batch size, one line per implementation (and per
    prompt/new-token setting when the grid has several), a marker per sampling mode."""
    require("matplotlib", "the benchmark's plot").use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("tok_s")]
    settings = sorted({(r["prompt_len"], r["new_tokens"]) for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = list(dict.fromkeys(r.get("sampling", "greedy") for r in rows))
    markers, styles = dict(greedy="o", nanogpt="s"), dict(greedy="-", nanogpt="--")
    colors = {}
    for impl in dict.fromkeys(r["impl"] for r in rows):
        for mode in modes:
            for prompt_len, new_tokens in settings:
                line = sorted(
                    (r["batch_size"], r["tok_s"])
                    for r in rows
                    if r["impl"] == impl
                    and r.get("sampling", "greedy") == mode
                    and (r["prompt_len"], r["new_tokens"]) == (prompt_len, new_tokens)
                )
                if not line:
                    continue
                label = impl if len(settings) == 1 else f"{impl} P={prompt_len} N={new_tokens}"
                label += f", {mode}" if len(modes) > 1 else ""
                drawn = ax.plot(
                    [b for b, _ in line],
                    [t for _, t in line],
                    marker=markers.get(mode, "^"),
                    linestyle=styles.get(mode, ":"),
                    color=colors.get((impl, prompt_len, new_tokens)),
                    label=label,
                )
                colors[(impl, prompt_len, new_tokens)] = drawn[0].get_color()
    ax.set_xscale("log", base=2)
    batch_sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s (prefill included)")
    hardware = report.get("hardware", {})
    on_cpu = hardware.get("platform", "cpu") == "cpu"
    where = hardware.get("cpu" if on_cpu else "device_kind") or report["device"]
    ax.set_title(f"{report['model']}, {report['dtype']}, {where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=120)
    plt.close(fig)


def speedups(rows: list[dict], reference: str = "jax") -> list[str]:
    """'jax / hf at greedy B=1 P=16 N=256: 2.31x tokens/s' for every other implementation."""
    lines = []
    timed = [r for r in rows if r.get("tok_s")]
    for ref in (r for r in timed if r["impl"] == reference):
        for other in timed:
            if other["impl"] != reference and cell_of(other) == cell_of(ref):
                mode, batch, prompt_len, num_new = cell_of(ref)
                lines.append(
                    f"{reference} / {other['impl']} at {mode} B={batch} P={prompt_len} "
                    f"N={num_new}: {ref['tok_s'] / other['tok_s']:.2f}x tokens/s"
                )
    return lines


def headline_lines(headline: list[dict]) -> list[str]:
    """'jax / best PyTorch (torch-fast) at greedy B=1 P=16 N=256: 1.40x tokens/s'."""
    return [
        f"jax / best PyTorch ({h['best_pytorch']}) at {h['sampling']} B={h['batch_size']} "
        f"P={h['prompt_len']} N={h['new_tokens']}: {h['jax_over_best_pytorch']:.2f}x tokens/s"
        for h in headline
    ]
