"""Dataset preparation in nanoGPT's format, and reproducible batches."""

import pickle

import numpy as np
import pytest
from conftest import SHAKESPEARE, assert_one_line_error, run_script

from nanogpt_jax.errors import UserError
from nanogpt_jax.tokenizer import CharTokenizer
from nanogpt_jax.training.data import (
    batch_rng,
    consecutive_windows,
    open_dataset,
    prepare_char_dataset,
    sample_batch,
    split_text,
)


def nanogpt_prepare(data: str):
    """nanoGPT's data/shakespeare_char/prepare.py, minus the file I/O."""
    chars = sorted(list(set(data)))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    train_data = data[: int(n * 0.9)]
    val_data = data[int(n * 0.9) :]
    train_ids = np.array([stoi[c] for c in train_data], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in val_data], dtype=np.uint16)
    meta = {"vocab_size": vocab_size, "itos": itos, "stoi": stoi}
    return train_ids.tobytes(), val_ids.tobytes(), pickle.dumps(meta)


def test_prepare_script_writes_nanogpt_files(tmp_path):
    data_dir = tmp_path / "shakespeare_char"
    result = run_script(
        "prepare_shakespeare_char", f"--input={SHAKESPEARE}", f"--data_dir={data_dir}"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(data_dir)
    assert "vocab size: 65" in result.stderr
    train, val, meta = nanogpt_prepare(SHAKESPEARE.read_text())
    assert (data_dir / "train.bin").read_bytes() == train
    assert (data_dir / "val.bin").read_bytes() == val
    assert (data_dir / "meta.pkl").read_bytes() == meta
    dataset = open_dataset(data_dir, block_size=256)
    assert (len(dataset.train), len(dataset.val)) == (1_003_854, 111_540)
    assert dataset.tokenizer.vocab_size == 65
    text = SHAKESPEARE.read_text()
    assert dataset.tokenizer.decode(dataset.val[:100]) == split_text(text)[1][:100]


def test_bpe_preparation_gives_nanogpts_token_counts(tmp_path):
    """nanoGPT's data/shakespeare/prepare.py reports 301,966 training and 36,059 validation
    tokens for tiny Shakespeare; a meta.pkl from a character-level run would relabel the ids."""
    data_dir = tmp_path / "shakespeare"
    prepare_char_dataset("stale", data_dir)
    result = run_script("prepare_shakespeare", f"--input={SHAKESPEARE}", f"--data_dir={data_dir}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(data_dir)
    assert "train has 301,966 tokens" in result.stderr
    assert "val has 36,059 tokens" in result.stderr
    assert not (data_dir / "meta.pkl").exists()
    dataset = open_dataset(data_dir, block_size=1024)
    assert (len(dataset.train), len(dataset.val)) == (301_966, 36_059)
    assert dataset.tokenizer.describe() == {"kind": "gpt2"}
    train_text, val_text = split_text(SHAKESPEARE.read_text())
    assert dataset.tokenizer.decode(dataset.train) == train_text  # byte-level BPE round-trips
    assert dataset.tokenizer.decode(dataset.val) == val_text


def test_prepare_without_input_offline_names_the_flag(tmp_path):
    # a proxy nobody listens on makes the download fail as it would offline
    proxy = "http://127.0.0.1:9"
    result = run_script(
        "prepare_shakespeare_char",
        f"--data_dir={tmp_path / 'd'}",
        env={"https_proxy": proxy, "HTTPS_PROXY": proxy},
        timeout=120,
    )
    assert_one_line_error(result, "--input")


def test_prepare_missing_input_file(tmp_path):
    result = run_script("prepare_shakespeare_char", f"--input={tmp_path / 'none.txt'}")
    assert_one_line_error(result, "none.txt")


def test_split_follows_nanogpt():
    train, val = split_text("abcdefghij" * 3 + "x")  # 31 characters: int(27.9) = 27
    assert (len(train), len(val)) == (27, 4)


def test_open_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "none", block_size=8)
    prepare_char_dataset("hello world, " * 20, tmp_path)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(UserError, match="no val.bin"):
        open_dataset(tmp_path, block_size=8)
    prepare_char_dataset("hello world, " * 20, tmp_path)
    with pytest.raises(UserError, match="fewer than block_size"):
        open_dataset(tmp_path, block_size=1000)


def test_batches_are_reproducible_shifted_windows(tmp_path):
    prepare_char_dataset("".join(chr(65 + i % 26) for i in range(5000)), tmp_path)
    dataset = open_dataset(tmp_path, block_size=16)
    x, y = sample_batch(dataset.train, (2, 3), 16, batch_rng(1337, 0, 5))
    assert x.shape == y.shape == (2, 3, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])  # targets are the next tokens
    np.testing.assert_array_equal((x + 1) % 26, y)  # the text counts A..Z
    again, _ = sample_batch(dataset.train, (2, 3), 16, batch_rng(1337, 0, 5))
    other, _ = sample_batch(dataset.train, (2, 3), 16, batch_rng(1337, 0, 6))
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, other)


def test_consecutive_windows_cover_the_split_once():
    tokens = np.arange(103, dtype=np.uint16)
    x, y = consecutive_windows(tokens, 10)
    assert x.shape == (10, 10)
    np.testing.assert_array_equal(x.ravel(), np.arange(100))
    np.testing.assert_array_equal(y.ravel(), np.arange(1, 101))


def test_char_tokenizer_reads_prepared_meta(tmp_path):
    prepare_char_dataset("to be or not to be", tmp_path)
    tokenizer = CharTokenizer.from_meta_pkl(tmp_path / "meta.pkl")
    assert tokenizer.itos == sorted(set("to be or not to be"))
