"""Checkpoint directories: atomic writes, no silent overwrite, clear errors when corrupt."""

import json

import numpy as np
import pytest
from flax import nnx

import nanogpt_jax
from nanogpt_jax import checkpoint
from nanogpt_jax.checkpoint import METADATA_FILE, params_of, save_model
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.model import GPT
from nanogpt_jax.tokenizer import CharTokenizer

CONFIG = GPTConfig(block_size=8, vocab_size=8, n_layer=1, n_head=1, n_embd=8)
TOKENIZER = CharTokenizer(list("abcdefgh"))


def params(seed=0):
    return params_of(GPT(CONFIG, rngs=nnx.Rngs(seed)))


def test_interrupted_write_leaves_nothing_that_loads(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped mid-write

    monkeypatch.setattr(checkpoint, "write_metadata", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "ckpt", params(), CONFIG, TOKENIZER)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging directory


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_model(tmp_path / "ckpt", params(0), CONFIG, TOKENIZER)
    before = nanogpt_jax.load(path).logits([[1, 2, 3]])
    disk_full = OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_metadata", lambda *a: (_ for _ in ()).throw(disk_full))
    with pytest.raises(UserError, match="writing failed, the previous one is unchanged"):
        save_model(path, params(1), CONFIG, TOKENIZER, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left
    np.testing.assert_array_equal(nanogpt_jax.load(path).logits([[1, 2, 3]]), before)


def test_existing_directory_needs_overwrite(tmp_path):
    path = save_model(tmp_path / "ckpt", params(0), CONFIG, TOKENIZER)
    with pytest.raises(UserError, match="already exists"):
        save_model(path, params(1), CONFIG, TOKENIZER)
    save_model(path, params(1), CONFIG, TOKENIZER, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_corrupt_checkpoints_are_clear_errors(tmp_path):
    path = save_model(tmp_path / "ckpt", params(), CONFIG, TOKENIZER)
    meta = json.loads((path / METADATA_FILE).read_text())
    meta["config"]["n_embd"] = 16  # the params on disk are 8 wide
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match"):
        nanogpt_jax.load(path)
    (path / METADATA_FILE).write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        nanogpt_jax.load(path)
    with pytest.raises(UserError, match="not a nanogpt-jax checkpoint"):
        nanogpt_jax.load(tmp_path)
    with pytest.raises(UserError, match="no such checkpoint"):
        nanogpt_jax.load(tmp_path / "missing")
