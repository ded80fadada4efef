"""Sample from a model: nanoGPT's sample.py flags, plus top_p, min_p, stop, stream and more.

python scripts/sample.py --init_from=shakespeare-char --start="ROMEO:"
python scripts/sample.py --out_dir=out-shakespeare-char --num_samples=1 --top_k=50
python scripts/sample.py --init_from=gpt2-xl --start=FILE:prompt.txt --dtype=bfloat16
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanogpt_jax.commands import (
    read_text_file,
    reserve_stdout_for_results,
    run,
    select_platform,
)
from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import flag, parse_flags

SEPARATOR = "---------------"


@dataclass
class SampleFlags:
    init_from: str = flag(
        "resume", "resume | gpt2 ... gpt2-xl | shakespeare-char | a checkpoint | PyTorch weights"
    )
    out_dir: str = flag("out", "the checkpoint read by --init_from=resume")
    start: str = flag("\n", "prompt text, or FILE:path to read it from a file")
    num_samples: int = flag(10, "samples drawn from the prompt")
    max_new_tokens: int = flag(500, "tokens generated per sample")
    temperature: float = flag(0.8, "divides the logits; 0 is greedy decoding")
    top_k: int | None = flag(200, "keep the k likeliest tokens; None disables top-k")
    top_p: float = flag(1.0, "nucleus sampling; 1.0 disables it")
    min_p: float = flag(0.0, "keep tokens with prob >= min_p * max prob; 0 disables it")
    stop: str | None = flag(None, "end a sample at this string (e.g. <|endoftext|>)")
    seed: int = flag(1337, "the same seed gives the same samples, whatever the batch size")
    batch_size: int | None = flag(None, "samples generated together (default: all)")
    stream: bool = flag(False, "print text as it is generated, one sample at a time")
    device: str | None = flag(None, "cpu | gpu | tpu, or cuda:1 (default: JAX's default backend)")
    dtype: str | None = flag(None, "float32 | bfloat16 | float16 (default: float32 on cpu)")
    compile: bool = flag(True, "accepted for nanoGPT command lines; a no-op, jax.jit compiles")
    mesh: str | None = flag(None, "e.g. data:4,model:2 over all devices (default: one device)")
    verify: bool = flag(False, "check the checkpoint's SHA-256 digests before loading it")
    meta: str | None = flag(None, "a nanoGPT ckpt.pt's meta.pkl (default: where nanoGPT looks)")


USAGE = "usage: python scripts/sample.py [--key=value ...]"


def main(argv: list[str]) -> None:
    flags = parse_flags(SampleFlags, argv, usage=USAGE)
    select_platform(flags.device)
    import jax

    from nanogpt_jax.bundle import load
    from nanogpt_jax.sharding import initialize_distributed, make_mesh

    if initialize_distributed():  # several processes, each running this same command
        reserve_stdout_for_results()
        if jax.process_index() != 0:  # only the first process prints
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    dtype = flags.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if flags.num_samples < 1:
        raise UserError(f"num_samples must be positive, got {flags.num_samples}")
    source = flags.out_dir if flags.init_from == "resume" else flags.init_from
    if flags.init_from == "resume" and not Path(source).is_dir():
        raise UserError(f"--init_from=resume: no checkpoint directory {source!r} (see --out_dir)")
    mesh = make_mesh(flags.mesh) if flags.mesh else None
    bundle = load(source, dtype=dtype, mesh=mesh, verify=flags.verify, meta=flags.meta)
    prompt = read_prompt(flags.start)
    options = dict(
        max_new_tokens=flags.max_new_tokens,
        temperature=flags.temperature,
        top_k=flags.top_k,
        top_p=flags.top_p,
        min_p=flags.min_p,
        stop=[flags.stop] if flags.stop else [],
        seed=flags.seed,
    )
    prompts = [prompt] * flags.num_samples
    began = time.perf_counter()
    if flags.stream:
        result = stream_samples(bundle, prompts, options)
    else:
        result = bundle.generate(prompts, batch_size=flags.batch_size, **options)
        for text in result.texts:
            print(text)
            print(SEPARATOR)
    total = time.perf_counter() - began
    print(
        f"{result.new_token_count} tokens in {total:.2f} s: compile {result.compile_seconds:.2f} s,"
        f" generation {result.generate_seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s)",
        file=sys.stderr,
    )


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        return read_text_file(Path(start[len("FILE:") :]), "start")
    return start


def stream_samples(bundle, prompts, options):
    """Generate samples one at a time, printing text as each chunk of steps arrives."""
    from nanogpt_jax.generate import merge_generations

    results = []
    for i, prompt in enumerate(prompts):
        sys.stdout.write(prompt)

        def show(row, text):
            sys.stdout.write(text)
            sys.stdout.flush()

        # sample i keeps its own key stream: row i of the whole request
        results.append(bundle.generate([prompt], on_text=show, first_row=i, **options))
        print()
        print(SEPARATOR, flush=True)
    return merge_generations(results)


def entry_point() -> None:
    run(main)


if __name__ == "__main__":
    entry_point()
