"""Convert PyTorch GPT-2 weights into a nanogpt-jax checkpoint directory, or back (--to).

python scripts/convert.py --from=gpt2-xl --out_dir=ckpt/gpt2-xl
python scripts/convert.py --from=path/to/hf_model_dir --out_dir=ckpt/mine
python scripts/convert.py --from=out-shakespeare-char/ckpt.pt --out_dir=ckpt/shakespeare
python scripts/convert.py --from=out-shakespeare-char --to=nanogpt --out_dir=torch/shakespeare
python scripts/convert.py --from=ckpt/mine --to=hf --out_dir=hf/mine
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from nanogpt_jax.commands import run
from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import flag, parse_flags


@dataclass
class ConvertFlags:
    from_: str | None = flag(
        None, "gpt2 ... gpt2-xl | a Hugging Face directory | a nanoGPT ckpt.pt | a checkpoint"
    )
    out_dir: str | None = flag(None, "the directory to write")
    to: str = flag("nanogpt-jax", "nanogpt-jax | nanogpt (ckpt.pt, meta.pkl) | hf (Hugging Face)")
    meta: str | None = flag(None, "a nanoGPT meta.pkl (default: where nanoGPT's sample.py looks)")
    force: bool = flag(False, "replace an existing out_dir")


USAGE = (
    "usage: python scripts/convert.py --from=SRC --out_dir=DIR [--to=nanogpt-jax|nanogpt|hf] "
    "[--meta=meta.pkl] [--force]"
)


def main(argv: list[str]) -> None:
    flags = parse_flags(ConvertFlags, argv, usage=USAGE)
    if not flags.from_ or not flags.out_dir:
        raise UserError(f"--from and --out_dir are required ({USAGE})")

    from nanogpt_jax.checkpoint import count_params, refuse_existing, save_model
    from nanogpt_jax.interop.convert import convert

    if flags.to not in ("nanogpt-jax", "nanogpt", "hf"):
        raise UserError(f"--to must be nanogpt-jax, nanogpt or hf, got {flags.to!r}")
    refuse_existing(flags.out_dir, flags.force)  # before the slow part
    if flags.to != "nanogpt-jax":
        from nanogpt_jax.interop.export import export_model

        if flags.meta:
            raise UserError("--meta is for reading a nanoGPT ckpt.pt, not for --to")
        print(export_model(flags.from_, flags.out_dir, flags.to, overwrite=flags.force))
        return
    converted = convert(flags.from_, flags.meta)
    if converted.vocabulary:
        print(f"vocabulary: {converted.vocabulary}", file=sys.stderr)
    path = save_model(
        flags.out_dir,
        converted.params,
        converted.config,
        converted.tokenizer,
        info={"source": converted.source},
        overwrite=flags.force,
    )
    print(
        f"converted {converted.source}: {count_params(converted.params) / 1e6:.2f}M parameters, "
        f"{converted.config}",
        file=sys.stderr,
    )
    print(path)


def entry_point() -> None:
    run(main)


if __name__ == "__main__":
    entry_point()
