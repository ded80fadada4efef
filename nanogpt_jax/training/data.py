"""Training data in nanoGPT's layout, and reproducible batches drawn from it.

A dataset directory holds `train.bin` and `val.bin` (token ids as raw uint16) and, for a
character-level vocabulary, nanoGPT's `meta.pkl`; without one the ids are GPT-2 BPE.

Batches are a pure function of (seed, stream, iteration): a resumed run draws exactly the batches
an uninterrupted one would have, with no sampler state to save.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from nanogpt_jax.errors import UserError
from nanogpt_jax.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer, write_meta_pkl

SPLITS = ("train", "val")
TRAIN_FRACTION = 0.9  # nanoGPT's prepare.py: the first 90% trains, the last 10% validates
TOKEN_DTYPE = np.uint16
META_FILE = "meta.pkl"

# independent random streams drawn from one seed
TRAIN_BATCHES = 0
EVAL_BATCHES = 1


def split_text(text: str) -> tuple[str, str]:
    """nanoGPT's split: train = text[:int(n * 0.9)], val = the rest."""
    cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


def prepare_char_dataset(text: str, data_dir: str | Path) -> dict[str, int]:
    """Write train.bin, val.bin and meta.pkl for `text` exactly as nanoGPT's
    shakespeare_char/prepare.py does. Returns the vocabulary and split sizes."""
    chars = sorted(set(text))
    if not chars:
        raise UserError("the input text is empty")
    if len(chars) > np.iinfo(TOKEN_DTYPE).max + 1:
        raise UserError(f"{len(chars)} distinct characters do not fit in uint16 token ids")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    stoi = {ch: i for i, ch in enumerate(chars)}
    sizes = {"vocab_size": len(chars)}
    for split, part in zip(SPLITS, split_text(text), strict=True):
        ids = np.array([stoi[c] for c in part], dtype=TOKEN_DTYPE)
        ids.tofile(data_dir / f"{split}.bin")
        sizes[split] = len(ids)
    write_meta_pkl(data_dir / META_FILE, chars)
    return sizes


def prepare_bpe_dataset(text: str, data_dir: str | Path) -> dict[str, int]:
    """Write train.bin and val.bin of GPT-2 BPE ids for `text` exactly as nanoGPT's
    shakespeare/prepare.py does (the split is by characters, each part encoded apart). A
    meta.pkl left from a character-level preparation is removed: it would relabel the ids.
    Returns the split sizes."""
    if not text:
        raise UserError("the input text is empty")
    tokenizer = GPT2Tokenizer()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"vocab_size": tokenizer.vocab_size}
    for split, part in zip(SPLITS, split_text(text), strict=True):
        ids = np.array(tokenizer.encode_ordinary(part), dtype=TOKEN_DTYPE)
        ids.tofile(data_dir / f"{split}.bin")
        sizes[split] = len(ids)
    (data_dir / META_FILE).unlink(missing_ok=True)
    return sizes


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits as read-only memory maps, and the tokenizer their ids belong to."""

    directory: Path
    train: np.ndarray  # (N_train,) uint16
    val: np.ndarray  # (N_val,) uint16
    tokenizer: Tokenizer

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val


def open_dataset(data_dir: str | Path, block_size: int) -> Dataset:
    """Memory-map a prepared dataset, checking that each split holds a block of tokens."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(
            f"data directory {data_dir} does not exist (prepare it first, e.g. "
            "python scripts/prepare_shakespeare_char.py)"
        )
    splits = {}
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise UserError(f"{data_dir}: no {split}.bin (prepare the dataset first)")
        if path.stat().st_size % np.dtype(TOKEN_DTYPE).itemsize:
            raise UserError(f"{path}: not a file of uint16 token ids (odd size)")
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        if len(tokens) <= block_size:
            raise UserError(
                f"{path}: {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}"
            )
        splits[split] = tokens
    meta = data_dir / META_FILE
    tokenizer = CharTokenizer.from_meta_pkl(meta) if meta.is_file() else GPT2Tokenizer()
    return Dataset(data_dir, splits["train"], splits["val"], tokenizer)


def batch_rng(seed: int, stream: int, *indices: int) -> np.random.Generator:
    """The generator for one batch: a function of the seed, its stream and its position."""
    return np.random.default_rng([seed, stream, *indices])


def sample_batch(
    tokens: np.ndarray, shape: tuple[int, ...], block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of `tokens`: inputs and next-token targets, each shape + (T,), int32.

    As nanoGPT's get_batch: starts uniform in [0, len - block_size), targets shifted by one.
    """
    starts = rng.integers(0, len(tokens) - block_size, size=shape)
    windows = np.asarray(tokens[starts[..., None] + np.arange(block_size + 1)], np.int32)
    return windows[..., :-1], windows[..., 1:]  # 2 x (*shape, T)


def consecutive_windows(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All non-overlapping block_size windows from the start, (W, T) inputs and targets; the
    few tokens past the last whole window are left out."""
    count = (len(tokens) - 1) // block_size
    tokens = np.asarray(tokens[: count * block_size + 1], np.int32)
    inputs = tokens[:-1].reshape(count, block_size)
    targets = tokens[1:].reshape(count, block_size)
    return inputs, targets
