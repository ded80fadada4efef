"""scripts/sample.py end to end: nanoGPT's output format, reproducibility across processes,
streaming, the persistent compilation cache, and one-line errors."""

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error, run_script

import nanogpt_jax
from nanogpt_jax.commands.sample import SampleFlags
from nanogpt_jax.tokenizer import CharTokenizer

SEPARATOR = "---------------"


def sample(checkpoint, *flags, env=None):
    return run_script("sample", f"--init_from={checkpoint}", *flags, env=env)


ENGINE_PROGRAMS = ("jit_prefill_and_start", "jit_decode")
# JAX names each program it finds in, misses in, or leaves out of the persistent cache
CACHE_LOGS = {"JAX_LOG_COMPILES": "1", "JAX_EXPLAIN_CACHE_MISSES": "1"}


def cache_events(stderr: str, program: str) -> set[str]:
    events = {
        "hit": f"Persistent compilation cache hit for '{program}'",
        "miss": f"PERSISTENT COMPILATION CACHE MISS for '{program}'",
        "too quick to keep": f"Not writing persistent cache entry for '{program}'",
    }
    return {name for name, line in events.items() if line in stderr}


def test_same_seed_same_text_in_two_processes(char_checkpoint, tmp_path):
    home = {"NANOGPT_JAX_HOME": str(tmp_path / "home"), **CACHE_LOGS}
    flags = ["--start=ROMEO:", "--num_samples=3", "--max_new_tokens=40", "--seed=5"]
    first = sample(char_checkpoint, *flags, env=home)
    second = sample(char_checkpoint, *flags, env=home)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    samples = first.stdout.split(SEPARATOR + "\n")
    assert len(samples) == 4 and samples[-1] == ""  # three samples, each closed by dashes
    assert all(s.startswith("ROMEO:") for s in samples[:3])
    assert "tokens/s" in first.stderr and "tokens/s" not in first.stdout

    # the first process compiled the engine's programs and kept them; the second compiled
    # none of them: each came from the persistent cache (a program compiled in under the
    # cache's 0.5 s threshold is not kept, and JAX says so)
    kept = [p for p in ENGINE_PROGRAMS if "too quick to keep" not in cache_events(first.stderr, p)]
    assert "jit_decode" in kept  # the decode loop always takes longer than that
    for program in ENGINE_PROGRAMS:
        assert "hit" not in cache_events(first.stderr, program)
        assert "miss" in cache_events(first.stderr, program)
    for program in kept:
        assert cache_events(second.stderr, program) == {"hit"}, (program, second.stderr)
    # temperature is an argument of the programs, not part of them: still nothing to compile
    third = sample(char_checkpoint, *flags, "--temperature=1.1", env=home)
    assert third.stdout != first.stdout
    for program in kept:
        assert cache_events(third.stderr, program) == {"hit"}, (program, third.stderr)

    other_seed = sample(char_checkpoint, *flags[:-1], "--seed=6", env=home)
    assert other_seed.stdout != first.stdout


# nanoGPT's sample.py, the settings at its top (its `compile` and `device` are PyTorch's)
NANOGPT_SAMPLE_DEFAULTS = dict(
    init_from="resume",
    out_dir="out",
    start="\n",
    num_samples=10,
    max_new_tokens=500,
    temperature=0.8,
    top_k=200,
    seed=1337,
)


def test_no_flags_samples_nanogpts_defaults_as_the_python_api_does(char_checkpoint, tmp_path):
    """`python sample.py` in a directory holding `out/`, as nanoGPT is run: its defaults,
    and stdout equal to `bundle.generate` with those values, printed as nanoGPT prints."""
    defaults = {f.name: f.default for f in dataclasses.fields(SampleFlags)}
    assert {k: defaults[k] for k in NANOGPT_SAMPLE_DEFAULTS} == NANOGPT_SAMPLE_DEFAULTS
    shutil.copytree(char_checkpoint, tmp_path / "out")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sample.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    expected = nanogpt_jax.load(char_checkpoint).generate(
        ["\n"] * 10, max_new_tokens=500, temperature=0.8, top_k=200, seed=1337
    )
    assert len(set(expected.texts)) == 10 and all(len(t) == 501 for t in expected.texts)
    assert result.stdout == "".join(f"{text}\n{SEPARATOR}\n" for text in expected.texts)


@pytest.mark.parametrize(
    "flag, option",
    [
        ("--top_k=4", dict(top_k=4)),
        ("--top_p=0.6", dict(top_p=0.6)),
        ("--min_p=0.2", dict(min_p=0.2)),
        ("--temperature=0.5", dict(temperature=0.5)),
    ],
)
def test_each_sampling_flag_reaches_generate(char_checkpoint, flag, option):
    base = dict(max_new_tokens=60, temperature=1.0, top_k=None, seed=4)
    bundle = nanogpt_jax.load(char_checkpoint)
    expected = bundle.generate(["KING:"] * 3, **(base | option)).texts
    assert expected != bundle.generate(["KING:"] * 3, **base).texts  # the option matters
    flags = ["--start=KING:", "--num_samples=3", "--max_new_tokens=60", "--seed=4"]
    result = sample(char_checkpoint, *flags, "--temperature=1.0", "--top_k=None", flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{text}\n{SEPARATOR}\n" for text in expected)


def test_streaming_prints_the_same_samples(char_checkpoint, tmp_path):
    flags = ["--start=KING:", "--num_samples=2", "--max_new_tokens=30", "--seed=9"]
    plain = sample(char_checkpoint, *flags, "--batch_size=2")
    streamed = sample(char_checkpoint, *flags, "--stream=True")
    assert plain.returncode == streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout


def test_a_nanogpt_run_samples_from_its_own_folder_as_nanogpt_does(nanogpt_char_run):
    """`python sample.py --out_dir=out-shakespeare-char` in nanoGPT's folder: ckpt.pt alone
    in out_dir, the vocabulary found in data/shakespeare_char/meta.pkl as nanoGPT's sample.py
    finds it. Greedy (top_k=1) past block_size, the text equals nanoGPT's generate on the same
    weights (the PyTorch reference model)."""
    import torch

    run = nanogpt_char_run
    assert sorted(p.name for p in run.out_dir.iterdir()) == ["ckpt.pt"]
    flags = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=60", "--top_k=1"]
    result = run_script("sample", f"--out_dir={run.out_dir.name}", *flags, cwd=run.root)
    assert result.returncode == 0, result.stderr
    assert "vocabulary: data/shakespeare_char/meta.pkl (65 characters)" in result.stderr
    tokenizer = CharTokenizer.from_meta_pkl(run.meta)
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    # nanoGPT's sample.py defaults, top_k=1: multinomial over a single token
    expected = tokenizer.decode(
        run.model.generate(prompt, 60, temperature=0.8, top_k=1)[0].tolist()
    )
    assert len(set(expected[6:])) > 10  # past block_size=32, and wandering
    assert result.stdout == f"{expected}\n{SEPARATOR}\n"


def test_a_char_model_without_its_meta_pkl_names_the_files_looked_for(nanogpt_char_run, tmp_path):
    shutil.copytree(nanogpt_char_run.out_dir, tmp_path / "out-shakespeare-char")
    result = run_script("sample", "--out_dir=out-shakespeare-char", cwd=tmp_path)
    assert_one_line_error(
        result,
        "needs its nanoGPT meta.pkl",
        str(tmp_path / "data" / "shakespeare_char" / "meta.pkl"),
        str(tmp_path / "out-shakespeare-char" / "meta.pkl"),
        "--meta",
    )
    # --meta names it; a meta.pkl beside ckpt.pt (as some copies of a run have it) is found
    flags = ["--num_samples=1", "--max_new_tokens=5", "--seed=2"]
    named = run_script(
        "sample",
        "--out_dir=out-shakespeare-char",
        f"--meta={nanogpt_char_run.meta}",
        *flags,
        cwd=tmp_path,
    )
    shutil.copy(nanogpt_char_run.meta, tmp_path / "out-shakespeare-char" / "meta.pkl")
    beside = run_script("sample", "--out_dir=out-shakespeare-char", *flags, cwd=tmp_path)
    assert named.returncode == beside.returncode == 0, named.stderr + beside.stderr
    assert named.stdout == beside.stdout and "vocabulary:" in beside.stderr
    (tmp_path / "out-shakespeare-char" / "meta.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    bad = run_script("sample", "--out_dir=out-shakespeare-char", *flags, cwd=tmp_path)
    assert_one_line_error(bad, "meta.pkl", "not a nanoGPT meta.pkl")


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
