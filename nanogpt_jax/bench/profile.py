"""Where a decode step's time goes: one generation traced by a profiler, summarized per op.

JAX implementations are traced by jax.profiler, PyTorch ones by torch.profiler; both write
Chrome trace JSON holding host and device events. Device events are a GPU's kernels (and
copies) or, on a CPU, the ops that do the work: those XLA runs on its own threads, or
PyTorch's aten operators. They may nest (a while loop contains its body's ops, aten::linear
calls aten::addmm), so each op is charged its exclusive time: its duration less that of the
ops inside it. Per decode step figures divide by the run's steps (prefill is included, a
small share of a long run):

    ops_per_step      device ops per step (on a GPU, kernels launched per token)
    busy_ms_per_step  time at least one device event was running; wall ms/step minus this is
                      time the device sat idle (launches, host round trips)
    top               ops by exclusive time: name, ms per step, calls per step, share
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

TOP_OPS = 25
COMPLETION = "end: "  # XLA:CPU traces an async op's completion as "end: <op>"
# lines a profiler derives from the device's own (the same work, relabelled): not counted again
DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework", "Launch Stats")
WAITING = re.compile(r"wait", re.IGNORECASE)  # "... (wait for completion)", "...::Await"


def trace_events(run, directory: Path) -> list[dict]:
    """The trace events of `run()`, from the Perfetto trace jax.profiler writes."""
    import jax

    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        run()
    traces = sorted(
        Path(directory).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime
    )
    if not traces:
        return []
    with gzip.open(traces[-1], "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def torch_trace_events(run, directory: Path) -> list[dict]:
    """The trace events of `run()` under torch.profiler: operators, and kernels on a GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        run()
    path = Path(directory) / "torch_trace.json"
    profiler.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def torch_device_events(events: list[dict]) -> list[dict]:
    """A torch trace's GPU kernels and copies, or on a CPU its aten operators."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    on_gpu = [e for e in complete if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return on_gpu or [e for e in complete if e.get("cat") == "cpu_op"]


def device_events(events: list[dict]) -> list[dict]:
    """A jax trace's complete events ("X") of the device lines: GPU streams, or XLA's CPU
    threads."""
    process = {}
    thread = {}
    for event in events:
        if event.get("ph") == "M" and event.get("name") == "process_name":
            process[event["pid"]] = event["args"]["name"]
        elif event.get("ph") == "M" and event.get("name") == "thread_name":
            thread[event["pid"], event["tid"]] = event["args"]["name"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]

    def line_name(event):
        return thread.get((event["pid"], event["tid"]), "")

    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    if devices:
        on_device = [
            e
            for e in complete
            if e["pid"] in devices and not line_name(e).startswith(DERIVED_LINES)
        ]
        streams = [e for e in on_device if line_name(e).startswith("Stream")]
        return streams or on_device
    # a CPU: XLA runs its ops on threads of its own (the PjRt client's, Eigen's pool), where
    # a thread waiting for the others is traced too
    return [e for e in complete if "XLA" in line_name(e) and not WAITING.search(e["name"])]


def exclusive_times(events: list[dict]) -> dict[str, list[float]]:
    """op name -> [exclusive microseconds, calls], nested events charged to the innermost; an
    op's completion event ("end: fusion.12", which XLA:CPU traces apart) is charged to the op
    and not counted as another call."""
    totals = defaultdict(lambda: [0.0, 0])
    by_line = defaultdict(list)
    for event in events:
        by_line[event["pid"], event["tid"]].append(event)
    for line in by_line.values():
        line.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_events = []  # [end, name] of the events containing the current time
        for event in line:
            start, end = event["ts"], event["ts"] + event["dur"]
            while open_events and open_events[-1][0] <= start:
                open_events.pop()
            if open_events:  # inside its parent: not the parent's own time
                totals[open_events[-1][1]][0] -= event["dur"]
            name = event["name"].removeprefix(COMPLETION)
            totals[name][0] += event["dur"]
            totals[name][1] += not event["name"].startswith(COMPLETION)
            open_events.append([end, name])
    return dict(totals)


def busy_microseconds(events: list[dict]) -> float:
    """Length of the union of the events' intervals."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def kind(name: str) -> str:
    """An op's name without its instance number: fusion.12 -> fusion."""
    return re.sub(r"[._]\d+$", "", name)


def summarize(events: list[dict], steps: int) -> dict:
    times = exclusive_times(events)
    total = sum(us for us, _ in times.values()) or 1.0
    ranked = sorted(times.items(), key=lambda item: -item[1][0])
    kinds = defaultdict(lambda: [0.0, 0])
    for name, (us, calls) in times.items():
        kinds[kind(name)][0] += us
        kinds[kind(name)][1] += calls

    def rows(items):
        return [
            {
                "name": name,
                "ms_per_step": us / 1e3 / steps,
                "calls_per_step": calls / steps,
                "share": us / total,
            }
            for name, (us, calls) in items[:TOP_OPS]
        ]

    return {
        "steps": steps,
        "ops_per_step": sum(calls for _, calls in times.values()) / steps,
        "busy_ms_per_step": busy_microseconds(events) / 1e3 / steps,
        "top": rows(ranked),
        "top_kinds": rows(sorted(kinds.items(), key=lambda item: -item[1][0])),
    }


def profile_generation(impl, prompts, num_new: int) -> dict | None:
    """Trace one generation of an implementation (already warm, drawing as set) with its library's
    profiler; None when the trace holds no device events."""
    run = lambda: impl.generate(prompts, num_new)
    with tempfile.TemporaryDirectory() as directory:
        if impl.name.startswith("jax"):
            events = device_events(trace_events(run, directory))
        else:
            events = torch_device_events(torch_trace_events(run, directory))
    return summarize(events, num_new) if events else None


def format_profile(summary: dict, title: str) -> str:
    lines = [
        title,
        f"{summary['ops_per_step']:.1f} device ops per step, device busy "
        f"{summary['busy_ms_per_step']:.3f} ms per step "
        f"({summary['steps']} steps, prefill included)",
    ]
    for heading, key in (("by kind", "top_kinds"), ("by op", "top")):
        lines += ["", f"{heading:<60} {'ms/step':>9} {'calls/step':>10} {'share':>6}"]
        for row in summary[key]:
            lines.append(
                f"{row['name'][:60]:<60} {row['ms_per_step']:9.4f} {row['calls_per_step']:10.2f}"
                f" {row['share']:6.1%}"
            )
    return "\n".join(lines) + "\n"
