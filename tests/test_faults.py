"""Files as users have them, and crashes: damaged checkpoints, processes killed with SIGKILL
mid-write, full disks. Real files and real processes; each case checks the exit status, a
single `error:` line (no traceback, a few lines in all), and that the previous data still
loads and equals what it was."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHAKESPEARE, assert_one_line_error, run_script, write_nanogpt_run
from flax import nnx

import nanogpt_jax
from nanogpt_jax.checkpoint import params_of, save_model
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.model import GPT
from nanogpt_jax.tokenizer import CharTokenizer
from nanogpt_jax.training.data import prepare_char_dataset

CONFIG = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
IDS = [[1, 2, 3, 4, 5]]


def assert_clean_error(result, *fragments: str) -> None:
    assert_one_line_error(result, *fragments)
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


def sample(path, *flags):
    return run_script(
        "sample", f"--init_from={path}", "--num_samples=1", "--max_new_tokens=3", *flags
    )


def largest_data_file(checkpoint: Path) -> Path:
    return max((checkpoint / "params").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shakespeare_chars):
    path = tmp_path_factory.mktemp("faults") / "ckpt"
    params = params_of(GPT(CONFIG, rngs=nnx.Rngs(0)))
    return save_model(path, params, CONFIG, CharTokenizer(shakespeare_chars))


@pytest.fixture
def copy(checkpoint, tmp_path):
    return Path(shutil.copytree(checkpoint, tmp_path / "copy"))


def test_a_truncated_data_file_is_named(copy):
    data = largest_data_file(copy)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    result = sample(copy)
    assert_clean_error(result, "damaged checkpoint", data.name, f"{size // 2} bytes", str(size))
    # a checkpoint of an earlier version, without its record: Orbax's own failure, one line
    (copy / "params" / "sha256sums.json").unlink()
    assert_clean_error(sample(copy), "damaged checkpoint")


def test_a_missing_data_file_is_named(copy):
    data = largest_data_file(copy)
    data.unlink()
    assert_clean_error(sample(copy), "damaged checkpoint", data.name, "missing")


def test_a_bit_flip_is_found_by_verify(copy, checkpoint):
    data = largest_data_file(copy)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    assert_clean_error(sample(copy, "--verify"), "damaged checkpoint", data.name, "changed")
    with pytest.raises(nanogpt_jax.UserError, match="changed since written"):
        nanogpt_jax.load(copy, verify=True)
    # without --verify only sizes are checked: the load may succeed; it never crashes
    unverified = sample(copy)
    assert "Traceback" not in unverified.stderr
    np.testing.assert_array_equal(  # the original is untouched
        nanogpt_jax.load(checkpoint, verify=True).logits(IDS),
        nanogpt_jax.load(checkpoint).logits(IDS),
    )


def test_damaged_or_mismatched_metadata_is_one_line(copy):
    meta_path = copy / "nanogpt_jax.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["n_embd"] = 48  # the arrays on disk are 32 wide
    meta["config"]["n_head"] = 3
    meta_path.write_text(json.dumps(meta))
    assert_clean_error(sample(copy), "does not match the model", "(96,) on disk", "(144,)")
    meta_path.write_text('{"format": 1, "config": ')
    assert_clean_error(sample(copy), "corrupt checkpoint metadata")
    meta_path.unlink()
    assert_clean_error(sample(copy), "not a nanogpt-jax checkpoint", "nanogpt_jax.json")


def test_truncated_pytorch_files_are_one_line(tmp_path, shakespeare_chars):
    from conftest import hf_gpt2

    run = write_nanogpt_run(tmp_path / "nanogpt", CONFIG, chars=shakespeare_chars)
    with open(run.ckpt, "r+b") as f:
        f.truncate(run.ckpt.stat().st_size // 3)
    result = run_script("sample", f"--init_from={run.ckpt}", f"--meta={run.meta}")
    assert_clean_error(result, "ckpt.pt", "not a readable PyTorch weights file")
    hf_gpt2().save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    result = run_script("convert", f"--from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'x'}")
    assert_clean_error(result, "model.safetensors", "not a readable safetensors file")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- interrupted conversions


def converted_logits(path) -> np.ndarray:
    return np.asarray(nanogpt_jax.load(path).logits(IDS))


def test_sigkill_during_convert_force_leaves_the_old_or_the_new_model(tmp_path, shakespeare_chars):
    """convert.py --force replacing a checkpoint, killed at random moments (mostly while it
    writes): the destination always loads, as exactly the old model or the new one."""
    # 3.2M parameters: writing takes long enough to be interrupted in the middle
    config = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=256)
    sources = [
        write_nanogpt_run(tmp_path / f"run{i}", config, chars=shakespeare_chars, seed=i)
        for i in range(2)
    ]
    destination = tmp_path / "ckpt"

    def convert(source, out_dir=destination):
        return [
            sys.executable,
            str(REPO / "scripts" / "convert.py"),
            f"--from={source.ckpt}",
            f"--meta={source.meta}",
            f"--out_dir={out_dir}",
            "--force",
        ]

    assert subprocess.run(convert(sources[0]), capture_output=True).returncode == 0
    expected = {}
    for i, source in enumerate(sources):
        subprocess.run(convert(source, tmp_path / f"reference{i}"), check=True, capture_output=True)
        expected[i] = converted_logits(tmp_path / f"reference{i}")
    assert not np.array_equal(expected[0], expected[1])

    rng = random.Random(0)
    kills_while_writing = 0
    for round_ in range(6):
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process = subprocess.Popen(convert(sources[(round_ + 1) % 2]), **quiet)
        if round_ % 3 == 2:  # anywhere in the run, the imports included
            time.sleep(rng.uniform(0, 6))
        else:  # while it writes: once its staging directory appears
            while process.poll() is None and not list(tmp_path.glob(".ckpt.partial-*")):
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
        kills_while_writing += bool(list(tmp_path.glob(".ckpt.partial-*")))
        process.send_signal(signal.SIGKILL)
        process.wait()
        logits = converted_logits(destination)
        matches = [i for i in expected if np.array_equal(logits, expected[i])]
        assert len(matches) == 1, f"round {round_}: the destination is neither model"
    assert kills_while_writing >= 2, kills_while_writing
    # the next successful write clears what the killed writers left beside the destination
    assert subprocess.run(convert(sources[0]), capture_output=True).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    np.testing.assert_array_equal(converted_logits(destination), expected[0])


def test_the_two_rename_fallback_killed_between_renames_keeps_the_old_model(
    checkpoint, tmp_path, monkeypatch, shakespeare_chars
):
    """Where the system cannot swap directories in one step, the old checkpoint is moved aside
    before the new one moves in. A writer killed between the two renames leaves only the
    aside copy (made here by hand: the window is microseconds wide); loading puts it back, and
    the next write through the fallback replaces it."""
    import nanogpt_jax.checkpoint as checkpoint_module

    destination = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    before = converted_logits(destination)
    destination.rename(tmp_path / ".ckpt.old-0badf00d")  # the first rename, then SIGKILL
    (tmp_path / ".ckpt.partial-0badf00d").mkdir()  # the new copy, half written
    np.testing.assert_array_equal(converted_logits(destination), before)

    monkeypatch.setattr(checkpoint_module, "exchange", lambda a, b: False)
    params = params_of(GPT(CONFIG, rngs=nnx.Rngs(1)))
    save_model(destination, params, CONFIG, CharTokenizer(shakespeare_chars), overwrite=True)
    assert not np.array_equal(converted_logits(destination), before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def with_file_size_limit(limit: int, command: list[str]) -> list[str]:
    """`command` (python SCRIPT ARGS...) in an interpreter that may write no file past `limit`
    bytes, as on a disk that fills up (the limit is set in the child: no fork of this
    multithreaded process)."""
    python, script, *args = command
    code = (
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return [python, "-c", code, script, *args]


def test_a_full_disk_during_convert_leaves_the_previous_checkpoint(checkpoint, tmp_path):
    """Writes cut short by a file-size limit (as by a full disk): replacing a checkpoint from
    a ckpt.pt, and replacing an exported ckpt.pt. One line, the previous files byte for byte."""
    destination = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    exported = tmp_path / "exported"
    export = [f"--from={checkpoint}", "--to=nanogpt", f"--out_dir={exported}"]
    assert run_script("convert", *export).returncode == 0
    before = converted_logits(destination)
    # TensorStore says why a write failed; torch.save only "basic_ios::clear: iostream error"
    for target, flags, reason in (
        (destination, [f"--from={exported / 'ckpt.pt'}", f"--out_dir={destination}"], "too large"),
        (exported, export, ""),
    ):
        previous = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
        command = [sys.executable, str(REPO / "scripts" / "convert.py"), *flags, "--force"]
        result = run(with_file_size_limit(10_000, command))
        assert_clean_error(result, str(target), "writing failed", "unchanged", reason)
        assert {
            p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()
        } == previous
    np.testing.assert_array_equal(converted_logits(destination), before)


# ---------------------------------------------------------------- interrupted training


TRAIN_FLAGS = [
    "--device=cpu",
    "--batch_size=4",
    "--block_size=32",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--dropout=0.1",
    "--gradient_accumulation_steps=2",
    "--learning_rate=1e-2",
    "--warmup_iters=2",
    "--max_iters=12",
    "--lr_decay_iters=12",
    "--eval_interval=2",
    "--eval_iters=2",
    "--log_interval=1",
]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults_data")
    prepare_char_dataset(SHAKESPEARE.read_text()[:200_000], directory)
    return directory


def train_command(out_dir, data_dir, *extra):
    return [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        f"--out_dir={out_dir}",
        f"--data_dir={data_dir}",
        *TRAIN_FLAGS,
        *extra,
    ]


# two iterations more, on the same learning-rate schedule
MORE = ["--init_from=resume", "--max_iters=14", "--lr_decay_iters=12"]


def run(command, **options):
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **options)


def iteration_losses(stderr: str) -> dict[int, str]:
    lines = [line.split(":") for line in stderr.splitlines() if line.startswith("iter ")]
    return {int(fields[0].split()[1]): fields[1].split(",")[0].strip() for fields in lines}


def evaluations(out_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in records]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, train_data):
    out_dir = tmp_path_factory.mktemp("straight") / "out"
    result = subprocess.run(
        train_command(out_dir, train_data), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return out_dir, iteration_losses(result.stderr)


def test_sigkill_during_training_resumes_from_the_newest_checkpoint(straight, train_data, tmp_path):
    """Killed at random iterations, checkpointing every two: each resume starts from the
    newest complete checkpoint, and the losses after it equal the uninterrupted run's."""
    straight_dir, straight_losses = straight
    assert sorted(straight_losses) == list(range(12))
    rng = random.Random(1)
    out_dir = tmp_path / "out"
    for attempt in range(2):
        process = subprocess.Popen(
            train_command(out_dir, train_data, *(["--init_from=resume"] if attempt else [])),
            stderr=subprocess.PIPE,
            text=True,
        )
        target = rng.randrange(3 + 4 * attempt, 6 + 4 * attempt)
        for line in process.stderr:  # kill it once it is past iteration `target`
            if line.startswith(f"iter {target}:"):
                time.sleep(rng.uniform(0, 0.3))
                break
        process.send_signal(signal.SIGKILL)
        process.wait()
        steps = sorted(int(p.name) for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit())
        assert steps, "no checkpoint was committed"
    newest = steps[-1]
    resumed = subprocess.run(
        train_command(out_dir, train_data, "--init_from=resume"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    losses = iteration_losses(resumed.stderr)
    assert min(losses) == newest  # it went on from the newest complete checkpoint
    assert losses == {i: straight_losses[i] for i in range(newest, 12)}
    assert evaluations(out_dir) == evaluations(straight_dir)
    # what the killed runs left half-written is gone after the successful one
    assert all(p.name.isdigit() for p in (out_dir / "checkpoints").iterdir())
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".")] == []


def test_a_damaged_newest_training_checkpoint_names_the_previous(straight, train_data, tmp_path):
    straight_dir, straight_losses = straight
    out_dir = Path(shutil.copytree(straight_dir, tmp_path / "out"))
    newest, previous = (out_dir / "checkpoints" / "12"), (out_dir / "checkpoints" / "10")
    assert newest.is_dir() and previous.is_dir()  # the step before the newest is kept
    data = max(newest.rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(10)
    resume = train_command(out_dir, train_data, *MORE)
    result = run(resume)
    assert_one_line_error(result, str(newest), "damaged", f"{previous} (iteration 10) is intact")
    assert result.stderr.strip().splitlines()[-1].startswith("error:")  # nothing after it
    shutil.move(newest, tmp_path / "damaged-12")  # what the message tells the user to do
    result = run(resume)
    assert result.returncode == 0, result.stderr
    losses = iteration_losses(result.stderr)
    assert min(losses) == 10 and [losses[10], losses[11]] == [
        straight_losses[10],
        straight_losses[11],
    ]


def test_a_full_disk_during_training_keeps_the_previous_checkpoint(straight, train_data, tmp_path):
    straight_dir, _ = straight
    out_dir = Path(shutil.copytree(straight_dir, tmp_path / "out"))
    more = train_command(out_dir, train_data, *MORE)
    # data files of a step are 25-105 kB here; the run's JSON files stay under 16 kB
    result = run(with_file_size_limit(16_000, more))
    assert_one_line_error(result, "checkpoints/14", "failed", "checkpoints/12 is intact", "large")
    assert result.stderr.strip().splitlines()[-1].startswith("error:")  # nothing after it
    again = run(more)
    assert again.returncode == 0, again.stderr
    assert min(iteration_losses(again.stderr)) == 12


# ---------------------------------------------------------------- a device that is not there


def has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:1"])
def test_a_missing_gpu_is_one_line(device, checkpoint, train_data, tmp_path):
    """nanoGPT's default `--device=cuda`, copied onto a machine without a GPU."""
    sampled = sample(checkpoint, f"--device={device}")
    trained = run(
        train_command(tmp_path / "out", train_data, "--max_iters=1", f"--device={device}")
    )
    if has_gpu():  # it is there (cuda:1 only on a machine with two)
        for result in (sampled, trained):
            if result.returncode != 0:
                assert_clean_error(result, device)
        return
    for result in (sampled, trained):
        assert_clean_error(result, f"device {device!r} is not available")
    assert not (tmp_path / "out").exists()
