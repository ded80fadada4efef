"""Tokenizers: GPT-2 BPE through tiktoken, nanoGPT char vocabularies read without unpickling
anything but plain data."""

import pickle

import pytest

from nanogpt_jax.errors import UserError
from nanogpt_jax.tokenizer import (
    CharTokenizer,
    GPT2Tokenizer,
    read_meta_pkl,
    tokenizer_from_description,
    write_meta_pkl,
)


def test_gpt2_bpe_round_trips_any_text():
    tokenizer = GPT2Tokenizer()
    for text in ["Hello, world!", "你好,我叫", " leading space\n\nand newlines", "<|endoftext|>x"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tokenizer.encode("<|endoftext|>") == [50256] == [tokenizer.eot_id]
    assert tokenizer.vocab_size == 50257


def test_char_tokenizer_from_meta_pkl(tmp_path, shakespeare_chars):
    write_meta_pkl(tmp_path / "meta.pkl", shakespeare_chars)
    tokenizer = CharTokenizer.from_meta_pkl(tmp_path / "meta.pkl")
    assert tokenizer.vocab_size == 65 and tokenizer.eot_id is None
    assert tokenizer.decode(tokenizer.encode("ROMEO:\nO!")) == "ROMEO:\nO!"
    with pytest.raises(UserError, match="outside") as error:
        tokenizer.encode("Café")
    assert "é" in str(error.value)
    again = tokenizer_from_description(tokenizer.describe())
    assert again.itos == tokenizer.itos


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_meta_pkl_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"stoi": {}, "itos": {}, "x": Exploit()}))
    with pytest.raises(UserError, match="refusing"):
        read_meta_pkl(path)
    assert "must never run" not in capsys.readouterr().out


def test_meta_pkl_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_meta_pkl(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="meta.pkl"):
        read_meta_pkl(tmp_path / "junk.pkl")
