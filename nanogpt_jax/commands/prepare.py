"""Prepare tiny Shakespeare as nanoGPT's data/*/prepare.py scripts do, in --data_dir:
by character (shakespeare_char: train.bin, val.bin, meta.pkl) or as GPT-2 BPE ids
(shakespeare: train.bin, val.bin), for fine-tuning GPT-2.

python scripts/prepare_shakespeare_char.py
python scripts/prepare_shakespeare_char.py --input=input.txt --data_dir=data/shakespeare_char
python scripts/prepare_shakespeare.py --input=input.txt   # data/shakespeare, GPT-2 BPE
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nanogpt_jax.commands import read_text_file, run
from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import flag, parse_flags
from nanogpt_jax.training.data import prepare_bpe_dataset, prepare_char_dataset

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DOWNLOAD_TIMEOUT_S = 30


@dataclass
class PrepareFlags:
    input: str | None = flag(None, "the text to prepare (default: download tiny Shakespeare)")
    data_dir: str = flag("data/shakespeare_char", "where train.bin, val.bin, meta.pkl go")


@dataclass
class PrepareBPEFlags:
    input: str | None = flag(None, "the text to prepare (default: download tiny Shakespeare)")
    data_dir: str = flag("data/shakespeare", "where train.bin and val.bin go")


def main(argv: list[str]) -> None:
    """scripts/prepare_shakespeare_char.py: one id per character."""
    usage = "usage: python scripts/prepare_shakespeare_char.py [--input=FILE] [--data_dir=DIR]"
    prepare(parse_flags(PrepareFlags, argv, usage=usage), prepare_char_dataset)


def bpe_main(argv: list[str]) -> None:
    """scripts/prepare_shakespeare.py: GPT-2 BPE ids."""
    usage = "usage: python scripts/prepare_shakespeare.py [--input=FILE] [--data_dir=DIR]"
    prepare(parse_flags(PrepareBPEFlags, argv, usage=usage), prepare_bpe_dataset)


def prepare(flags, prepare_dataset) -> None:
    data_dir = Path(flags.data_dir)
    text = read_text_file(Path(flags.input), "input") if flags.input else downloaded_input(data_dir)
    sizes = prepare_dataset(text, data_dir)
    print(f"length of dataset in characters: {len(text):,}", file=sys.stderr)
    print(f"vocab size: {sizes['vocab_size']}", file=sys.stderr)
    print(f"train has {sizes['train']:,} tokens", file=sys.stderr)
    print(f"val has {sizes['val']:,} tokens", file=sys.stderr)
    print(data_dir)


def downloaded_input(data_dir: Path) -> str:
    """data_dir/input.txt, downloaded first if missing (nanoGPT keeps it there too)."""
    path = data_dir / "input.txt"
    if not path.is_file():
        print(f"downloading {SHAKESPEARE_URL}", file=sys.stderr)
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(
                f"cannot download tiny Shakespeare ({reason}); offline, pass --input=FILE"
            ) from None
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return read_text_file(path, "input")


def entry_point() -> None:
    run(main)


def bpe_entry_point() -> None:
    run(bpe_main)


if __name__ == "__main__":
    entry_point()
