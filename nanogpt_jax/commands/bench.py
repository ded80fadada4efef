"""Generation throughput: this project's engine against nanoGPT and Hugging Face, same weights.

python scripts/bench.py --model=gpt2 --batch_sizes=1,8 --prompt_len=16 --new_tokens=256
python scripts/bench.py --model=tiny --batch_sizes=1,2 --new_tokens=8 --out=/tmp/bench
python scripts/bench.py --model=gpt2-xl --device=gpu --dtype=bfloat16 --impls=jax,hf
XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python scripts/bench.py --model=gpt2 --batch_sizes=8 --impls=jax --mesh=data:8

The table goes to stdout; DIR/results.json, results.csv and throughput.png hold everything.
See nanogpt_jax/bench/run.py for what each column measures.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from nanogpt_jax.commands import run, select_platform
from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import flag, number_list, parse_flags


@dataclass
class BenchFlags:
    model: str = flag(
        "gpt2", "tiny | gpt2 ... gpt2-xl (shapes, random weights) | a checkpoint | PyTorch weights"
    )
    batch_sizes: str = flag("1,8", "comma list; every combination of the three lists is run")
    prompt_len: str = flag("16", "comma list of prompt lengths, in tokens")
    prompt_lens: str | None = flag(None, "the same as --prompt_len (e.g. 16,512)")
    new_tokens: str = flag("256", "comma list of generated lengths, in tokens")
    repeats: int = flag(3, "timed runs per cell, after the warm-ups")
    impls: str | None = flag(
        None,
        "jax,jax-nocache,torch-nanogpt,torch-compile,torch-fast,hf,hf-static "
        "(default: all but torch-compile)",
    )
    sampling: str = flag("greedy", "greedy | nanogpt (temperature 0.8, top_k 200) | both")
    device: str = flag("cpu", "cpu | gpu")
    dtype: str | None = flag(
        None, "float32 | bfloat16 | float16 (default: float32 on cpu, else bf16)"
    )
    threads: int | None = flag(None, "CPU threads of every implementation (default: all cores)")
    check_steps: int = flag(32, "greedy steps that must agree before anything is timed")
    seed: int = flag(0, "weights of a random shape, and the prompts")
    max_seconds: float | None = flag(
        None, "skip or shorten runs of the no-cache implementations estimated to take longer"
    )
    strict: bool = flag(True, "False: time disagreeing implementations anyway, flagged")
    out: str = flag("bench-out", "directory for results.json, results.csv, throughput.png")
    # on CPU, several devices come from XLA_FLAGS=--xla_force_host_platform_device_count=8
    mesh: str | None = flag(
        None, "e.g. data:8 or data:4,model:2: adds jax-mesh on that many devices, with scaling"
    )
    profile: bool = flag(False, "trace one more run of each cell: DIR/profile-*.txt")
    bound: bool = flag(True, "time each cell's decode-step products alone, in XLA and torch")
    torch_cpu_variants: str = flag(
        "eager,freezing,cpp-wrapper",
        "ways torch-fast may run on a CPU, the fastest kept per shape: eager, compiled, "
        "freezing, max-autotune, cpp-wrapper, freezing+cpp-wrapper",
    )


USAGE = "usage: python scripts/bench.py [--model=gpt2] [--batch_sizes=1,8] [--key=value ...]"


def main(argv: list[str]) -> None:
    flags = parse_flags(BenchFlags, argv, usage=USAGE)
    if flags.device not in ("cpu", "gpu"):
        raise UserError(f"device must be cpu or gpu, got {flags.device!r}")
    if flags.device == "gpu":
        # JAX would otherwise take most of the GPU's memory up front, leaving none for torch
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if flags.threads is not None:
        if flags.threads < 1:
            raise UserError(f"threads must be positive, got {flags.threads}")
        # read when JAX starts its CPU backend, so set before anything touches it
        eigen = "true" if flags.threads > 1 else "false"
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen={eigen} "
            f"intra_op_parallelism_threads={flags.threads}"
        ).strip()
    select_platform(flags.device)
    import jax

    from nanogpt_jax.bench import implementations as bench_impls
    from nanogpt_jax.bench import report as bench_report
    from nanogpt_jax.bench.run import Settings, run_benchmark, validate

    # compile_s is a cold compile: no programs from earlier runs
    jax.config.update("jax_enable_compilation_cache", False)
    settings = Settings(
        model=flags.model,
        batch_sizes=number_list("batch_sizes", flags.batch_sizes),
        prompt_lens=number_list(
            "prompt_lens" if flags.prompt_lens else "prompt_len",
            flags.prompt_lens or flags.prompt_len,
        ),
        new_tokens=number_list("new_tokens", flags.new_tokens),
        repeats=flags.repeats,
        impls=impl_list(flags.impls, bench_impls),
        device=flags.device,
        dtype=flags.dtype or ("float32" if flags.device == "cpu" else "bfloat16"),
        threads=flags.threads,
        check_steps=flags.check_steps,
        seed=flags.seed,
        max_seconds=flags.max_seconds,
        strict=flags.strict,
        profile=flags.profile,
        bound=flags.bound,
        sampling=flags.sampling,
        torch_cpu_variants=tuple(flags.torch_cpu_variants.split(",")),
    )
    if flags.mesh is not None:
        # the mesh's tokens/s are compared with the engine's on one device
        impls = ("jax", *(name for name in settings.impls if name != "jax"), "jax-mesh")
        settings = dataclasses.replace(settings, impls=impls, mesh=flags.mesh)
    validate(settings)
    report = run_benchmark(settings, flags.out)
    out = Path(flags.out)
    print(f"{report['source']}, {settings.dtype}, {report['hardware'].get('cpu', '')}")
    print(bench_report.format_table(report["results"], report.get("headline", [])))
    for line in bench_report.speedups(report["results"]):
        print(line)
    for line in bench_report.headline_lines(report.get("headline", [])):
        print(line)
    print(f"agree: {report['agree']}  (results in {out}/results.json, .csv, throughput.png)")
    if not report["agree"]:
        raise UserError(
            f"implementations disagree on greedy tokens: {report['agreement']['impls']} "
            f"(see {out}/results.json)"
        )


def impl_list(text: str | None, bench_impls) -> tuple[str, ...]:
    if text is None:
        return tuple(name for name in bench_impls.DEFAULT_IMPLS if bench_impls.available(name))
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if name not in bench_impls.ALL_IMPLS:
            raise UserError(f"unknown impl {name!r} (known: {', '.join(bench_impls.ALL_IMPLS)})")
        if not bench_impls.available(name):
            needs = " and ".join(bench_impls.NEEDS[name])
            raise UserError(f"impl {name} needs {needs}: pip install 'nanogpt-jax[bench]'")
    if not names or len(set(names)) != len(names):
        raise UserError(f"--impls must name distinct implementations, got {text!r}")
    return names


def entry_point() -> None:
    run(main)


if __name__ == "__main__":
    entry_point()
