"""Prepare tiny Shakespeare for character-level training, as nanoGPT's
data/shakespeare_char/prepare.py does: train.bin, val.bin and meta.pkl in --data_dir.

python scripts/prepare_shakespeare_char.py
python scripts/prepare_shakespeare_char.py --input=input.txt --data_dir=data/shakespeare_char
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nanogpt_jax.commands import read_text_file, run
from nanogpt_jax.data import prepare_char_dataset
from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import flag, parse_flags

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DOWNLOAD_TIMEOUT_S = 30


@dataclass
class PrepareFlags:
    input: str | None = flag(None, "the text to prepare (default: download tiny Shakespeare)")
    data_dir: str = flag("data/shakespeare_char", "where train.bin, val.bin, meta.pkl go")


USAGE = "usage: python scripts/prepare_shakespeare_char.py [--input=FILE] [--data_dir=DIR]"


def main(argv: list[str]) -> None:
    flags = parse_flags(PrepareFlags, argv, usage=USAGE)
    data_dir = Path(flags.data_dir)
    text = read_text_file(Path(flags.input), "input") if flags.input else downloaded_input(data_dir)
    sizes = prepare_char_dataset(text, data_dir)
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


if __name__ == "__main__":
    entry_point()
