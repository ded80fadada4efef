"""Command lines parsed as nanoGPT writes them: --key=value literals, bare booleans, help."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from nanogpt_jax.errors import UserError
from nanogpt_jax.flags import flag, parse_flags


@dataclass
class Flags:
    out_dir: str = flag("out", "where results go")
    top_k: int | None = flag(200, "None disables it")
    temperature: float = flag(0.8, "0 is greedy")
    force: bool = flag(False, "replace what is there")


def test_values_are_literals_and_strings_may_be_bare_words():
    flags = parse_flags(Flags, ["--out_dir=out-shakespeare", "--top_k=None", "--temperature=1"])
    assert flags == Flags(out_dir="out-shakespeare", top_k=None, temperature=1, force=False)
    assert parse_flags(Flags, ["--out_dir=None"]).out_dir == "None"  # a str flag keeps text


def test_a_bare_boolean_flag_is_true():
    assert parse_flags(Flags, ["--force"]).force is True
    assert parse_flags(Flags, ["--force", "--force=False"]).force is False


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--top_k"], "needs a value"),
        (["--top_k=many"], "top_k"),
        (["--force=maybe"], "force"),
        (["--forse"], "unknown flag --forse"),
        (["out"], "unexpected argument"),
    ],
)
def test_bad_command_lines(argv, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_flags(Flags, argv)


def test_help_lists_every_flag_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_flags(Flags, ["--help"], usage="usage: demo")
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: demo"
    assert "  --top_k=200  None disables it" in lines
    assert "  --force=False  replace what is there" in lines


def test_every_command_explains_every_flag():
    from nanogpt_jax.commands.bench import BenchFlags
    from nanogpt_jax.commands.convert import ConvertFlags
    from nanogpt_jax.commands.prepare import PrepareBPEFlags, PrepareFlags
    from nanogpt_jax.commands.sample import SampleFlags
    from nanogpt_jax.training.config import TrainConfig

    commands = (BenchFlags, ConvertFlags, PrepareFlags, PrepareBPEFlags, SampleFlags, TrainConfig)
    for flags_class in commands:
        for field in dataclasses.fields(flags_class):
            assert field.metadata.get("help"), f"{flags_class.__name__}.{field.name}"
