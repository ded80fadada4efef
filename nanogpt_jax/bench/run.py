"""Generation throughput of this project's engine against nanoGPT and Hugging Face, on the
same weights, over a grid of batch sizes, prompt lengths and numbers of new tokens.

Order of a run:
  1. agreement: every implementation decodes the same prompts greedily in float32 (full-precision
     matmuls); the first `check_steps` tokens must equal the `jax` engine's, so that a fast
     wrong result cannot win. bfloat16 runs are checked in float32 too: rounding differs
     between libraries, and greedy paths legitimately part at near-ties.
  2. the hardware: memory bandwidth and matmul rate, measured now (`bench/hardware.py`); the
     read rate again next to each cell, for its floor.
  3. for each grid cell and implementation, all greedy: one-token runs give the time to first
     token (prefill + one step); full runs give tokens/s; the difference, over the remaining
     steps, gives the steady decode time per step. Warm-ups are not timed; compilation is
     reported apart. Medians of `repeats` runs, and the fastest.

Definitions (one row per implementation and cell):
  tok_s             B * N / median full-run seconds (prefill included)
  ms_per_token      (median full run - median first-token run) / (N - 1): one decode step,
                    which gives every row of the batch one token
  decode_tok_s      B / ms_per_token
  floor_ms_per_token the hardware floor of one KV-cached decode step at the mean context, at
                    read_gbs, the read rate measured next to the cell (`bench/hardware.py`)
  fraction_of_floor floor_ms_per_token / ms_per_token (1.0 = at the floor)
  bound_ms_per_token  the step's weight products alone, in the faster of XLA and PyTorch on
                    this machine (`bound.py`)
  fraction_of_bound bound_ms_per_token / ms_per_token: the share of a step those take
  scaling_efficiency  (jax-mesh rows) tok_s on the mesh's N devices / (N * the jax row's
                    tok_s on one device), same cell: 1.0 is perfect scaling
  ops_per_step, busy_ms_per_step  (with `profile`) from one more run, traced by jax.profiler
                    or torch.profiler: device ops (GPU kernels; on a CPU, XLA ops or aten
                    operators) per step and the time the device was busy; the op-by-op
                    breakdown goes to DIR/profile-IMPL-DRAW-bB-pP-nN.txt (`bench/profile.py`)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from nanogpt_jax.bench import bound as bench_bound
from nanogpt_jax.bench import hardware as bench_hardware
from nanogpt_jax.bench import implementations as bench_impls
from nanogpt_jax.bench import profile as bench_profile
from nanogpt_jax.bench import report as bench_report
from nanogpt_jax.config import PRESETS, GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.extras import require

# a shape for smoke tests: a few seconds for every implementation
TINY = GPTConfig(
    block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=64, activation_function="gelu_new"
)
SHAPES = {"tiny": TINY, **PRESETS}


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = "gpt2"  # a shape (tiny, gpt2 ... gpt2-xl: random weights) or a checkpoint
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_lens: tuple[int, ...] = (16,)
    new_tokens: tuple[int, ...] = (256,)
    repeats: int = 3
    impls: tuple[str, ...] = bench_impls.DEFAULT_IMPLS
    device: str = "cpu"  # cpu | gpu
    dtype: str = "float32"
    threads: int | None = None  # torch's CPU threads (XLA's are set before JAX starts)
    check_steps: int = 32
    seed: int = 0
    max_seconds: float | None = None  # skip or shorten no-cache runs estimated to take longer
    strict: bool = True  # stop before timing when implementations disagree
    mesh: str | None = None  # e.g. data:4,model:2: also time `jax-mesh` on that many devices
    profile: bool = False  # trace one more run of each cell: where a step's time goes
    bound: bool = True  # time each cell's decode-step products alone (`bench/bound.py`)
    sampling: str = "greedy"  # greedy | nanogpt (temperature 0.8, top_k 200) | both
    torch_cpu_variants: tuple[str, ...] = (
        bench_impls.TORCH_CPU_CANDIDATES
    )  # torch-fast's ways to run on a CPU


# How the timed runs draw: greedy, or nanoGPT's sample.py defaults
SAMPLING_MODES = {"greedy": (0.0, None), "nanogpt": (0.8, 200)}


class IdTokenizer:
    """Token ids as text: random weights have no vocabulary worth decoding."""

    eot_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def describe(self) -> dict:
        return {"kind": "ids"}


def validate(settings: Settings) -> None:
    """Refuse settings that cannot run, before anything slow starts."""
    from nanogpt_jax.bundle import DTYPES, pytorch_weights, read_model, resolve
    from nanogpt_jax.checkpoint import read_metadata

    if settings.repeats < 1 or settings.check_steps < 1:
        raise UserError("repeats and check_steps must be positive")
    variants = bench_impls.TORCH_CPU_VARIANTS
    if not settings.torch_cpu_variants or set(settings.torch_cpu_variants) - set(variants):
        raise UserError(f"torch_cpu_variants: choose from {', '.join(variants)}")
    if settings.sampling not in (*SAMPLING_MODES, "both"):
        raise UserError(f"sampling must be greedy, nanogpt or both, got {settings.sampling!r}")
    if settings.dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}")
    if settings.max_seconds is not None and settings.max_seconds <= 0:
        raise UserError(f"max_seconds must be positive, got {settings.max_seconds}")
    if settings.mesh is not None:
        bench_mesh(settings.mesh)
    config = SHAPES.get(settings.model)
    if config is None:
        path = resolve(settings.model)
        # PyTorch weights carry their config inside: reading it means converting them
        config = (read_model if pytorch_weights(path) else read_metadata)(path)[0]
    longest = max(settings.prompt_lens) + max(settings.new_tokens)
    checked = settings.prompt_lens[0] + settings.check_steps
    if max(longest, checked) > config.block_size:
        # past block_size the context slides and Hugging Face's GPT-2 runs out of positions
        raise UserError(
            f"prompt_len + new_tokens (and prompt_len + check_steps) must fit "
            f"block_size={config.block_size}; got {max(longest, checked)}"
        )
    uses_torch = any(bench_impls.NEEDS.get(name) for name in settings.impls)
    if settings.device == "gpu" and uses_torch:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device=gpu: torch sees no CUDA device (run only --impls=jax,...)")


def bench_mesh(spec: str):
    """The mesh of `--mesh` over the first devices, which may be fewer than all of them."""
    import jax

    from nanogpt_jax.sharding import make_mesh, mesh_sizes

    sizes = mesh_sizes(spec)
    count = sizes["data"] * sizes["model"]
    if count > jax.device_count():
        raise UserError(
            f"mesh {spec!r} needs {count} devices, {jax.device_count()} are available "
            "(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    return make_mesh(spec, jax.devices()[:count])


def load_model(name: str, seed: int):
    """(config, tokenizer, float32 parameters on the host, description) of a shape or a
    checkpoint."""
    import jax
    from flax import nnx

    if name in SHAPES:
        from nanogpt_jax.checkpoint import params_of
        from nanogpt_jax.model import GPT

        config = SHAPES[name]
        # GPT-2's initialisation; kept on the host, where the torch exports read it
        params = jax.device_get(params_of(GPT(config, rngs=nnx.Rngs(seed))))
        return config, IdTokenizer(config.vocab_size), params, f"{name} shape, random weights"
    from nanogpt_jax.bundle import load

    bundle = load(name)
    params = jax.device_get(nnx.to_pure_dict(bundle.params))
    return bundle.config, bundle.tokenizer, params, f"checkpoint {name}"


def random_bundle(spec: str, dtype: str = "float32", mesh=None):
    """The bundle of `random:SHAPE` (tiny, gpt2 ... gpt2-xl): GPT-2's random initialisation
    with GPT-2's tokenizer (token ids as text for tiny), for serving benchmarks offline."""
    import jax
    from flax import nnx

    from nanogpt_jax.bundle import make_bundle
    from nanogpt_jax.checkpoint import params_of
    from nanogpt_jax.model import GPT
    from nanogpt_jax.tokenizer import GPT2Tokenizer

    shape = spec.removeprefix("random:")
    if shape not in SHAPES:
        raise UserError(f"{spec}: the shapes are {', '.join(SHAPES)}")
    config = SHAPES[shape]
    params = jax.device_get(params_of(GPT(config, rngs=nnx.Rngs(0))))
    tokenizer = IdTokenizer(config.vocab_size) if shape == "tiny" else GPT2Tokenizer()
    return make_bundle(config, tokenizer, params, dtype, {"source": spec}, mesh)


def run_benchmark(settings: Settings, out_dir: str | Path) -> dict:
    """Run everything, writing DIR/results.json and .csv after each row and the plot at the end."""
    import jax

    from nanogpt_jax.bundle import make_bundle

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.threads is not None and any(bench_impls.NEEDS.get(n) for n in settings.impls):
        import torch

        torch.set_num_threads(settings.threads)
    config, tokenizer, params, source = load_model(settings.model, settings.seed)
    rng = np.random.default_rng(settings.seed)
    report = {
        "agree": None,
        "device": settings.device,
        "dtype": settings.dtype,
        "model": settings.model,
        "source": source,
        "config": config.to_dict(),
        "sampling": {m: SAMPLING_MODES[m] for m in sampling_modes(settings)},
        "settings": dataclasses.asdict(settings),
        "hardware": {},
        "agreement": {},
        "results": [],
    }

    log("checking that the implementations agree (float32, greedy)")
    prompts = rng.integers(0, tokenizer.vocab_size, (2, settings.prompt_lens[0]))
    report["agreement"] = check_agreement(settings, config, tokenizer, params, prompts)
    report["agree"] = report["agreement"]["agree"]
    bench_report.write_results(out_dir, report)
    if not report["agree"]:
        log(f"IMPLEMENTATIONS DISAGREE: {report['agreement']['impls']}")
        if settings.strict:
            return report

    log("measuring memory bandwidth and matmul rate")
    hardware = bench_hardware.measure_hardware(settings.dtype)
    hardware.update(library_versions())
    report["hardware"] = hardware

    bundle = make_bundle(config, tokenizer, params, settings.dtype)
    mesh = bench_mesh(settings.mesh) if settings.mesh else None
    impls = bench_impls.build(
        settings.impls,
        bundle,
        params,
        torch_device(settings),
        settings.dtype,
        mesh,
        settings.torch_cpu_variants,
    )
    weight_bytes = weights_read_per_step(bundle)
    itemsize = jax.numpy.dtype(bundle.dtype).itemsize
    cells = [
        (mode, b, p, n)
        for mode in sampling_modes(settings)
        for p in settings.prompt_lens
        for n in settings.new_tokens
        for b in settings.batch_sizes
    ]
    tqdm = require("tqdm", "the benchmark").tqdm

    bounds = report["bounds"] = []
    progress = tqdm(total=len(cells) * len(impls), file=sys.stderr, unit="run")
    for mode, batch, prompt_len, num_new in cells:
        prompts = rng.integers(0, tokenizer.vocab_size, (batch, prompt_len))
        reference = None
        cost = bench_hardware.decode_step_cost(
            config, weight_bytes, batch, prompt_len + num_new / 2, itemsize
        )
        bandwidth = bench_hardware.bandwidth_now()  # this cell's, not the run's start's
        floor_ms = 1e3 * bench_hardware.floor_seconds(cost, hardware | bandwidth)
        bound = products_bound(settings, bundle, batch, bounds)
        for name, impl in impls.items():
            progress.set_description(f"{name} {mode} B={batch} P={prompt_len} N={num_new}")
            row = dict(impl=name, sampling=mode, batch_size=batch, prompt_len=prompt_len)
            row |= dict(new_tokens=num_new, devices=impl.devices)
            impl.sampling = SAMPLING_MODES[mode]
            try:
                row |= time_runs(impl, prompts, num_new, settings)
            except Exception as e:  # a graph break, an unsupported device: say so, go on
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                log(f"{name} failed on B={batch} P={prompt_len}: {row['error']}")
            row["variant"] = impl.variant
            # other processes' load distorts timings, the more so on few cores: keep it on record
            row["load_avg"] = os.getloadavg()[0]
            tokens = row.pop("tokens", None)
            if mode == "greedy":  # the same tokens as the first implementation, step by step
                reference = tokens if reference is None else reference
                row["agree"] = report["agreement"]["impls"][name]["agree"]
                row["agree_steps"] = agreeing_steps(reference, tokens)  # vs the first, timed dtype
            elif tokens is not None:  # a draw: only shapes and ids can be checked
                in_range = tokens.min() >= 0 and tokens.max() < tokenizer.vocab_size
                row["valid_ids"] = bool(tokens.shape == (batch, num_new) and in_range)
            row["read_gbs"] = bandwidth["read_gbs"]
            row["floor_ms_per_token"] = floor_ms
            ms = row.get("ms_per_token")
            row["fraction_of_floor"] = floor_ms / ms if ms else None
            if bound:
                row["bound_ms_per_token"] = bound["bound_ms"]
                row["fraction_of_bound"] = bound["bound_ms"] / ms if ms else None
            row["scaling_efficiency"] = scaling_efficiency(row, report["results"])
            report["results"].append(row)
            report["headline"] = headline(report["results"])
            bench_report.write_results(out_dir, report)
            if settings.profile and row.get("tok_s"):  # the timings are on disk first
                progress.set_description(f"tracing {name} B={batch} P={prompt_len} N={num_new}")
                row |= profile_cell(impl, mode, prompts, num_new, out_dir, settings.dtype)
                bench_report.write_results(out_dir, report)
            progress.update()
    progress.close()
    try:  # the results are on disk already; the plot is a convenience
        bench_report.write_plot(out_dir, report)
    except UserError as e:
        log(f"note: no throughput.png: {e}")
    return report


def products_bound(settings: Settings, bundle, batch: int, bounds: list) -> dict:
    """The weight products' bound for a batch size (`bench/bound.py`), measured once and kept
    in `bounds`; none with a mesh or `bound=False`."""
    if not settings.bound or settings.mesh:
        return {}
    for known in bounds:
        if known["batch_size"] == batch:
            return known
    torch_too = settings.device == "cpu" and any(bench_impls.NEEDS.get(n) for n in settings.impls)
    measured = bench_bound.products_bound(bundle.params, batch, torch_too)
    bounds.append(dict(batch_size=batch, **measured))
    return bounds[-1]


def profile_cell(impl, mode: str, prompts, num_new: int, out_dir: Path, dtype: str) -> dict:
    """ops_per_step and busy_ms_per_step of one traced run, its breakdown written beside the
    results; nothing when the trace holds no device events."""
    try:
        summary = bench_profile.profile_generation(impl, prompts, num_new)
    except Exception as e:  # the profiler needs platform tooling (CUPTI on a GPU); timings stand
        log(f"profiling {impl.name} failed: {type(e).__name__}: {e}")
        return {"profile_error": f"{type(e).__name__}: {e}"}
    if summary is None:
        return {}
    batch, prompt_len = prompts.shape
    title = (
        f"{impl.name}, {dtype}, {mode}, batch {batch}, prompt {prompt_len}, {num_new} new tokens"
    )
    path = out_dir / f"profile-{impl.name}-{mode}-b{batch}-p{prompt_len}-n{num_new}.txt"
    path.write_text(bench_profile.format_profile(summary, title))
    return {
        "ops_per_step": summary["ops_per_step"],
        "busy_ms_per_step": summary["busy_ms_per_step"],
        "profile": summary,
    }


def check_agreement(settings: Settings, config, tokenizer, params, prompts) -> dict:
    """Greedy float32 tokens of every implementation against the first one's.

    Matrix products run at full float32 precision (no TF32 on GPUs) so that rounding cannot
    part greedy paths; the implementations are freed afterwards.
    """
    import jax

    from nanogpt_jax.bundle import make_bundle

    bundle = make_bundle(config, tokenizer, params, "float32")
    mesh = bench_mesh(settings.mesh) if settings.mesh else None
    impls = bench_impls.build(
        settings.impls,
        bundle,
        params,
        torch_device(settings),
        "float32",
        mesh,
        settings.torch_cpu_variants[:1],  # one way suffices to check the tokens
    )
    outputs = {}
    with jax.default_matmul_precision("highest"):
        for name, impl in impls.items():
            log(f"  {name}")
            outputs[name] = impl.generate(prompts, settings.check_steps)
    reference_name, reference = next(iter(outputs.items()))
    verdicts = {}
    for name, tokens in outputs.items():
        same = agreeing_steps(reference, tokens)
        agree = same == settings.check_steps
        verdicts[name] = {"agree": agree, "first_mismatch": None if agree else same}
    return {
        "agree": all(v["agree"] for v in verdicts.values()),
        "reference": reference_name,
        "steps": settings.check_steps,
        "rows": int(prompts.shape[0]),
        "prompt_len": int(prompts.shape[1]),
        # a random model can repeat one token forever, which a broken decoder may match too
        "distinct_tokens": int(len(np.unique(reference))),
        "impls": verdicts,
    }


def sampling_modes(settings: Settings) -> list[str]:
    return list(SAMPLING_MODES) if settings.sampling == "both" else [settings.sampling]


def headline(rows: list[dict]) -> list[dict]:
    """Per cell: jax's tokens/s over the fastest PyTorch implementation's, and which it was."""
    cells: dict[tuple, dict] = {}
    for row in rows:
        if not row.get("tok_s"):
            continue
        cell = (row["sampling"], row["batch_size"], row["prompt_len"], row["new_tokens"])
        entry = cells.setdefault(cell, {})
        faster = row["tok_s"] > entry.get("best_pytorch_tok_s", 0.0)
        if row["impl"] == "jax":
            entry["jax_tok_s"] = row["tok_s"]
        elif row["impl"] in bench_impls.PYTORCH_IMPLS and faster:
            entry["best_pytorch"], entry["best_pytorch_tok_s"] = row["impl"], row["tok_s"]
    out = []
    for (mode, batch, prompt_len, num_new), entry in cells.items():
        if "jax_tok_s" in entry and "best_pytorch" in entry:
            ratio = entry["jax_tok_s"] / entry["best_pytorch_tok_s"]
            out.append(
                dict(sampling=mode, batch_size=batch, prompt_len=prompt_len, new_tokens=num_new)
                | entry
                | {"jax_over_best_pytorch": ratio}
            )
    return out


def scaling_efficiency(row: dict, earlier: list[dict]) -> float | None:
    """A multi-device row's tokens/s over N times the single-device `jax` row of its cell."""
    if row.get("devices", 1) == 1 or not row.get("tok_s"):
        return None

    def cell(r):
        return (r.get("sampling"), r["batch_size"], r["prompt_len"], r["new_tokens"])

    for other in earlier:
        if other["impl"] == "jax" and cell(other) == cell(row):
            return row["tok_s"] / (row["devices"] * other["tok_s"]) if other.get("tok_s") else None
    return None


def torch_device(settings: Settings) -> str:
    return "cuda" if settings.device == "gpu" else "cpu"


def agreeing_steps(reference, tokens) -> int | None:
    """How many leading steps give the same token in every row."""
    if reference is None or tokens is None:
        return None
    differs = np.any(np.asarray(reference) != np.asarray(tokens), axis=0)
    return int(np.argmax(differs)) if differs.any() else int(differs.shape[0])


def time_runs(impl, prompts, num_new: int, settings: Settings) -> dict:
    """Timings of one implementation on one cell; `tokens` is a full run's output."""
    batch, prompt_len = prompts.shape
    compiled_before = impl.compile_seconds
    impl.reset_peak()

    def run(n, given=prompts):
        began = time.perf_counter()
        tokens = impl.generate(given, n)
        return time.perf_counter() - began, tokens

    first_ttft, _ = run(1)  # a warm-up (compiles the one-token programs)
    ttfts = [run(1)[0] for _ in range(settings.repeats)]
    ttft = statistics.median(ttfts)
    repeats = settings.repeats
    if settings.max_seconds is not None and impl.recomputes:
        # without a cache every step is a forward pass over the whole context, which grows
        # from the prompt to P + N - 1 tokens (cropped to block_size by the implementation):
        # a step timed at both ends, the mean of the two times N. (A cached step costs far
        # less than a long prompt's prefill: cached implementations are not estimated.)
        longest = np.concatenate([prompts] * -(-(prompt_len + num_new - 1) // prompt_len), 1)
        longest = longest[:, : prompt_len + num_new - 1]
        compiled = impl.compile_seconds
        run(1, longest)  # a warm-up: compiles where the implementation compiles
        estimate = num_new * (ttft + run(1, longest)[0]) / 2
        if compiled is not None:  # that program is not one the timed runs use
            compiled_before += impl.compile_seconds - compiled
        if estimate > settings.max_seconds:
            return {"skipped": f"estimated {estimate:.0f} s > max_seconds={settings.max_seconds}"}
        repeats = max(1, min(repeats, int(settings.max_seconds // estimate) - 1))

    # a full-length warm-up: jit compiles; eager PyTorch on a GPU picks kernels and grows its
    # allocator's cache on the first pass over each new shape
    first_full, _ = run(num_new)
    runs = [run(num_new) for _ in range(repeats)]
    totals = [seconds for seconds, _ in runs]
    total = statistics.median(totals)
    if impl.compile_seconds is not None:
        compile_s = impl.compile_seconds - compiled_before
    elif impl.compiles:  # torch.compile: what the warm-ups took beyond a warm run
        compile_s = max(0.0, first_full - total) + max(0.0, first_ttft - ttft)
    else:
        compile_s = None
    # None when noise swamps the difference (tiny models, a handful of steps)
    ms_per_token = 1e3 * (total - ttft) / (num_new - 1) if num_new > 1 and total > ttft else None
    peak = impl.peak_bytes(prompts.shape, num_new)
    return {
        "tok_s": batch * num_new / total,
        "tok_s_best": batch * num_new / min(totals),
        "decode_tok_s": 1e3 * batch / ms_per_token if ms_per_token else None,
        "ms_per_token": ms_per_token,
        "ttft_s": ttft,
        "compile_s": compile_s,
        "total_s": total,
        "total_s_min": min(totals),
        "warmup_s": first_full,
        "repeats": repeats,
        "peak_mem_gb": peak / 1e9 if peak is not None else None,
        "tokens": runs[-1][1],
    }


def weights_read_per_step(bundle) -> int:
    """Bytes of every parameter but wpe, of which a step reads one row per token."""
    import jax
    from flax import nnx

    params = nnx.to_pure_dict(bundle.params)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    return total - params["wpe"]["embedding"].nbytes


def library_versions() -> dict:
    versions = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    for module in ("torch", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    if versions["torch"]:
        import torch

        versions["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            versions["torch_device"] = torch.cuda.get_device_name()
    return versions


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
