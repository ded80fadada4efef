"""What a lower-precision compute dtype costs in accuracy: the same weights in float32 and in
--dtype, greedy continuations compared token by token, and the logits of float32's sequences
compared position by position.

python scripts/dtype_accuracy.py --init_from=shakespeare-char
python scripts/dtype_accuracy.py --init_from=gpt2 --dtype=bfloat16 --new_tokens=128

One line per prompt and a summary go to stdout: the greedy steps both dtypes share, how many of
float32's next-token choices --dtype makes on float32's own sequences, and the largest logit
difference relative to the largest float32 logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanogpt_jax.commands import load_model, run, select_platform
from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import flag, parse_flags

# the prompts' source: text any of the tokenizers reads (a character model's too)
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. "
    "resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people."
)


@dataclass
class AccuracyFlags:
    init_from: str = flag(
        "shakespeare-char",
        "gpt2 ... gpt2-xl | shakespeare-char | a checkpoint | PyTorch weights | random:gpt2",
    )
    dtype: str = flag("bfloat16", "bfloat16 | float16: compared with float32")
    prompts: int = flag(4, "prompts, windows of the same text at different offsets")
    prompt_len: int = flag(16, "tokens per prompt")
    new_tokens: int = flag(128, "greedy tokens per prompt")
    device: str | None = flag(None, "cpu | gpu | tpu (default: JAX's default backend)")


USAGE = "usage: python scripts/dtype_accuracy.py [--key=value ...]"


def main(argv: list[str]) -> None:
    flags = parse_flags(AccuracyFlags, argv, usage=USAGE)
    if flags.dtype not in ("bfloat16", "float16"):
        raise UserError(f"dtype must be bfloat16 or float16, got {flags.dtype!r}")
    for name in ("prompts", "prompt_len", "new_tokens"):
        if getattr(flags, name) < 1:
            raise UserError(f"{name} must be positive, got {getattr(flags, name)}")
    select_platform(flags.device)
    reference, lower = (load_model(flags.init_from, dtype) for dtype in ("float32", flags.dtype))
    prompts = prompt_rows(reference.tokenizer.encode(TEXT), flags.prompts, flags.prompt_len)
    report = compare(reference, lower, prompts, flags.new_tokens)
    print(f"{flags.init_from}: {flags.dtype} against float32, greedy, {flags.new_tokens} tokens")
    print("prompt  shared_steps  argmax_agree  max_rel_logit_err")
    for i, row in enumerate(report["rows"]):
        print(
            f"{i:6d}  {row['shared_steps']:12d}  {row['argmax_agree']:12.4f}  "
            f"{row['max_rel_logit_err']:17.2e}"
        )
    print(
        f"all     {report['shared_steps_min']:12d}  {report['argmax_agree']:12.4f}  "
        f"{report['max_rel_logit_err']:17.2e}"
    )


def prompt_rows(ids: list[int], count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens, spread over `ids`."""
    if len(ids) < length:
        raise UserError(f"prompt_len {length} exceeds the {len(ids)} tokens of the text")
    starts = np.linspace(0, len(ids) - length, count).astype(int)
    return [ids[s : s + length] for s in starts]


def compare(reference, lower, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy continuations of both bundles (same weights, two dtypes) from prompts of one
    length, and `lower`'s logits on `reference`'s sequences (their last block_size tokens)
    against `reference`'s."""
    options = dict(max_new_tokens=new_tokens, temperature=0.0)
    ours = reference.generate(prompts, **options).tokens
    theirs = lower.generate(prompts, **options).tokens
    P = len(prompts[0])
    sequences = ours[:, -reference.config.block_size :]
    want = np.asarray(reference.logits(sequences))
    got = np.asarray(lower.logits(sequences))
    rows = []
    for r in range(len(prompts)):
        differs = np.flatnonzero(ours[r, P:] != theirs[r, P:])
        scale = np.max(np.abs(want[r]))
        rows.append(
            dict(
                shared_steps=int(differs[0]) if differs.size else new_tokens,
                argmax_agree=float(np.mean(want[r].argmax(-1) == got[r].argmax(-1))),
                max_rel_logit_err=float(np.max(np.abs(got[r] - want[r])) / scale),
            )
        )
    return dict(
        rows=rows,
        shared_steps_min=min(row["shared_steps"] for row in rows),
        argmax_agree=float(np.mean([row["argmax_agree"] for row in rows])),
        max_rel_logit_err=max(row["max_rel_logit_err"] for row in rows),
    )


def entry_point() -> None:
    run(main)


if __name__ == "__main__":
    entry_point()
