"""scripts/sample.py end to end: nanoGPT's output format, reproducibility across processes,
streaming, the persistent compilation cache, and one-line errors."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error, run_script

SEPARATOR = "---------------"


def sample(checkpoint, *flags, env=None):
    return run_script("sample", f"--init_from={checkpoint}", *flags, env=env)


def test_same_seed_same_text_in_two_processes(char_checkpoint, tmp_path):
    home = {"NANOGPT_JAX_HOME": str(tmp_path / "home")}
    flags = ["--start=ROMEO:", "--num_samples=3", "--max_new_tokens=40", "--seed=5"]
    first = sample(char_checkpoint, *flags, env=home)
    second = sample(char_checkpoint, *flags, env=home)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    samples = first.stdout.split(SEPARATOR + "\n")
    assert len(samples) == 4 and samples[-1] == ""  # three samples, each closed by dashes
    assert all(s.startswith("ROMEO:") for s in samples[:3])
    assert "tokens/s" in first.stderr and "tokens/s" not in first.stdout

    # the second process found every program in the persistent compilation cache
    cached = sorted(p.name for p in (tmp_path / "home" / "xla").iterdir())
    assert cached
    third = sample(char_checkpoint, *flags, "--temperature=1.1", env=home)
    assert sorted(p.name for p in (tmp_path / "home" / "xla").iterdir()) == cached
    assert third.stdout != first.stdout

    other_seed = sample(char_checkpoint, *flags[:-1], "--seed=6", env=home)
    assert other_seed.stdout != first.stdout


def test_streaming_prints_the_same_samples(char_checkpoint, tmp_path):
    flags = ["--start=KING:", "--num_samples=2", "--max_new_tokens=30", "--seed=9"]
    plain = sample(char_checkpoint, *flags, "--batch_size=2")
    streamed = sample(char_checkpoint, *flags, "--stream=True")
    assert plain.returncode == streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout


def test_a_nanogpt_run_directory_samples_as_its_conversion_does(char_checkpoint):
    """nanoGPT's `--out_dir=out-shakespeare-char` (ckpt.pt and meta.pkl) works unconverted."""
    nanogpt_out_dir = char_checkpoint.parent / "torch"
    flags = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=20", "--seed=3"]
    direct = run_script("sample", f"--out_dir={nanogpt_out_dir}", *flags)
    converted = sample(char_checkpoint, *flags)
    assert direct.returncode == 0, direct.stderr
    assert "converting" in direct.stderr and "ckpt.pt" in direct.stderr
    assert direct.stdout == converted.stdout


def test_prompt_from_file_and_long_prompts(char_checkpoint, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\n" * 10)  # 70 characters, block_size is 32
    result = sample(
        char_checkpoint, f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=5"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:\n" * 10)
    assert "block_size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flag, fragment",
    [
        ("--temperature=-1", "temperature"),
        ("--top_k=0", "top_k"),
        ("--top_p=1.5", "top_p"),
        ("--top_p=0", "top_p"),
        ("--num_samples=two", "num_samples"),
        ("--tempreature=0.5", "--tempreature"),
        ("--start=ROMEO: ©", "outside"),
        ("--start=", "empty prompt"),
        ("--start=FILE:/no/such/prompt.txt", "no such file"),
        ("--batch_size=0", "batch_size"),
        ("--seed", "needs a value"),
    ],
)
def test_bad_input_is_one_line(char_checkpoint, flag, fragment):
    result = sample(char_checkpoint, "--num_samples=1", "--max_new_tokens=5", flag)
    assert_one_line_error(result, fragment)


def test_missing_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run_script("sample", f"--out_dir={tmp_path / 'nope'}"), "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "nanogpt_jax.json").write_text("{not json")
    assert_one_line_error(run_script("sample", f"--init_from={broken}"), "corrupt")


PLACEMENT = """
import sys, jax
from nanogpt_jax.commands import select_platform
select_platform(sys.argv[1])
import nanogpt_jax
bundle = nanogpt_jax.load("shakespeare-char")
out = bundle.generate(["ROMEO:"], max_new_tokens=12, seed=4)
placed = {str(d) for leaf in jax.tree.leaves(bundle.params) for d in leaf.devices()}
print(sorted(placed), repr(out.texts[0]))
"""


def test_a_device_index_puts_the_model_there(tmp_path):
    """nanoGPT's --device=cuda:1, tried on two host CPU devices: the restored parameters live on
    the device named, and the text is the one device 0 gives."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

    def place(device):
        result = subprocess.run(
            [sys.executable, "-c", PLACEMENT, device],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, **env},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    first, second = place("cpu:0"), place("cpu:1")
    assert first.startswith("['cpu:0'] ") and second.startswith("['cpu:1'] ")
    assert first.split("] ", 1)[1] == second.split("] ", 1)[1]
    missing = run_script("sample", "--init_from=shakespeare-char", "--device=cpu:3", env=env)
    assert_one_line_error(missing, "cpu:3")
    assert_one_line_error(run_script("sample", "--device=mps"), "mps")
