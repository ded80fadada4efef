"""Optional dependencies: a command that needs a missing one says in one line which extra to
install, and the benchmark still writes its results when only the plot cannot be drawn."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, SHAKESPEARE, assert_one_line_error, hf_gpt2, write_nanogpt_run

from nanogpt_jax.config import GPTConfig
from nanogpt_jax.training.data import prepare_char_dataset


def run_without(modules: list[str], script: str, *args: str, cwd=REPO):
    """scripts/<script>.py in a fresh interpreter where importing `modules` fails, as in an
    environment that never installed them."""
    code = (
        "import runpy, sys\n"
        f"for name in {modules!r}: sys.modules[name] = None\n"
        f"sys.argv = [{script!r}] + {list(args)!r}\n"
        f"runpy.run_path({str(REPO / 'scripts' / f'{script}.py')!r}, run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory, shakespeare_chars):
    root = tmp_path_factory.mktemp("extras")
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16)
    run = write_nanogpt_run(root / "nanogpt", config, chars=shakespeare_chars)
    hf_gpt2().save_pretrained(root / "hf")
    return root, run


CONVERT = "pip install 'nanogpt-jax[convert]'"
CASES = {  # what is missing, the command, what the error must say
    "ckpt.pt": ("torch", "convert --from={ckpt} --out_dir={out}", f"torch: {CONVERT}"),
    "safetensors": (
        "safetensors",
        "convert --from={hf} --out_dir={out}",
        f"safetensors: {CONVERT}",
    ),
    "hub": (
        "huggingface_hub",
        "convert --from=gpt2 --out_dir={out}",
        f"huggingface_hub: {CONVERT}",
    ),
    "to-nanogpt": (
        "torch",
        "convert --from=shakespeare-char --to=nanogpt --out_dir={out}",
        "torch",
    ),
    "to-hf": ("transformers", "convert --from={hf} --to=hf --out_dir={out}", "[bench]'"),
    "sample": ("torch", "sample --init_from={ckpt} --meta={meta} --max_new_tokens=2", CONVERT),
    "train": ("torch", "train --init_from={ckpt} --meta={meta} --data_dir={out}", CONVERT),
}


@pytest.mark.parametrize("case", CASES)
def test_a_missing_extra_is_one_line_naming_it(sources, tmp_path, case):
    missing, command, needs = CASES[case]
    root, run = sources
    if case == "train":  # a dataset to fine-tune on, so the command reaches init_from
        prepare_char_dataset(SHAKESPEARE.read_text()[:20_000], tmp_path / "out")
    values = dict(ckpt=run.ckpt, meta=run.meta, hf=root / "hf", out=tmp_path / "out")
    script, *flags = command.format(**values).split()
    result = run_without([missing], script, *flags)
    assert_one_line_error(result, needs)
    assert not (tmp_path / "out" / "params").exists()


def test_the_benchmark_without_matplotlib_still_writes_its_results(tmp_path):
    out = tmp_path / "bench"
    flags = ["--model=tiny", "--batch_sizes=1", "--prompt_len=4", "--new_tokens=4"]
    result = run_without(
        ["matplotlib"], "bench", *flags, "--impls=jax", "--repeats=1", f"--out={out}"
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        "no throughput.png" in result.stderr and "pip install 'nanogpt-jax[bench]'" in result.stderr
    )
    report = json.loads((out / "results.json").read_text())
    assert report["results"][0]["impl"] == "jax" and report["results"][0]["tok_s"] > 0
    assert (out / "results.csv").is_file() and not (out / "throughput.png").exists()
