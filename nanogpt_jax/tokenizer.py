"""Tokenizers behind one interface: GPT-2 BPE (tiktoken) and nanoGPT's character vocabularies."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Protocol

from nanogpt_jax.errors import UserError


class Tokenizer(Protocol):
    vocab_size: int  # ids the tokenizer can produce; a model may pad its embedding beyond it
    eot_id: int | None  # end-of-text id, if the vocabulary has one

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def describe(self) -> dict[str, Any]: ...


class GPT2Tokenizer:
    """GPT-2's byte-level BPE. tiktoken's `r50k_base` has the same ranks, pattern and
    `<|endoftext|>` (50256) as its `gpt2` encoding, and downloads one file instead of two."""

    vocab_size = 50257
    eot_id = 50256

    def __init__(self):
        import tiktoken

        try:
            self._encoding = tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken raises plain requests/IO errors when offline
            raise UserError(
                f"cannot load the GPT-2 BPE vocabulary through tiktoken ({type(e).__name__}); "
                "go online once or point TIKTOKEN_CACHE_DIR at a cache that holds r50k_base"
            ) from None

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special={"<|endoftext|>"})

    def encode_ordinary(self, text: str) -> list[int]:
        """Special tokens' text encoded as plain text, as nanoGPT's data preparation does."""
        return self._encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes: a streamed token may end in the middle of a UTF-8 character."""
        return self._encoding.decode_bytes([int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        return {"kind": "gpt2"}


class CharTokenizer:
    """nanoGPT's character-level vocabulary (`meta.pkl`: vocab_size, stoi, itos)."""

    eot_id = None

    def __init__(self, itos: list[str]):
        if len(set(itos)) != len(itos) or any(len(c) != 1 for c in itos):
            raise UserError("char vocabulary must be distinct single characters")
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise UserError(
                f"prompt has characters outside this model's {self.vocab_size}-character "
                f"vocabulary: {''.join(unknown)!r}"
            )
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode()

    def describe(self) -> dict[str, Any]:
        return {"kind": "char", "itos": "".join(self.itos)}

    @classmethod
    def from_meta_pkl(cls, path: str | Path) -> CharTokenizer:
        meta = read_meta_pkl(path)
        itos = meta.get("itos")
        if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))):
            raise UserError(f"{path}: 'itos' is not a map from 0..n-1 to characters")
        return cls([itos[i] for i in range(len(itos))])


def tokenizer_from_description(description: dict[str, Any]) -> Tokenizer:
    kind = description.get("kind")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(list(description["itos"]))
    raise UserError(f"unknown tokenizer kind {kind!r}")


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads pickles of plain containers only: any class or function reference is refused,
    so a malicious meta.pkl cannot run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def read_meta_pkl(path: str | Path) -> dict[str, Any]:
    """nanoGPT's meta.pkl (a pickled dict of ints, strings and dicts), read without running code."""
    path = Path(path)
    try:
        data = _DataOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a nanoGPT meta.pkl ({e})") from None
    if not isinstance(data, dict) or "itos" not in data or "stoi" not in data:
        raise UserError(f"{path}: not a nanoGPT meta.pkl (expected a dict with stoi and itos)")
    return data


def write_meta_pkl(path: str | Path, chars: list[str]) -> None:
    """The same bytes nanoGPT's prepare.py writes, so either project reads the other's data."""
    meta = {
        "vocab_size": len(chars),
        "itos": {i: ch for i, ch in enumerate(chars)},
        "stoi": {ch: i for i, ch in enumerate(chars)},
    }
    with open(path, "wb") as f:
        pickle.dump(meta, f)
