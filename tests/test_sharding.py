"""Generation on a device mesh gives what one device gives, with Megatron-style parameter
placement. The layouts run in a subprocess with 8 host CPU devices, so that every other test
keeps its single device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script, spread_model

from nanogpt_jax.checkpoint import save_model
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.tokenizer import CharTokenizer


def spread_checkpoint(directory, config, chars, seed):
    _, params = spread_model(config, seed=seed)
    return save_model(directory, params, config, CharTokenizer(chars))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shakespeare_chars):
    # vocab 96 (65 characters, padded) and 4 heads: both split evenly over 2 and 4 devices
    config = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64)
    directory = tmp_path_factory.mktemp("mesh") / "model"
    return spread_checkpoint(directory, config, shakespeare_chars, seed=4)


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory, shakespeare_chars):
    # vocab 65 and 3 heads: neither divides over model:2, so both stay whole on every device
    config = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=3, n_embd=48)
    directory = tmp_path_factory.mktemp("mesh_odd") / "model"
    return spread_checkpoint(directory, config, shakespeare_chars, seed=2)


@pytest.fixture(scope="module")
def runs(checkpoint, odd_checkpoint):
    script = Path(__file__).with_name("sharded_generation.py")
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(odd_checkpoint)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def layouts(runs):
    return runs["even"]


def new_tokens(record: dict, kind: str) -> list[list[int]]:
    """Each row's generated tokens, after its own prompt."""
    lengths = record["lengths"][0 if kind == "greedy" else 1]
    return [
        row[start:end]
        for row, start, end in zip(record[kind], record["prompt_lengths"], lengths, strict=True)
    ]


@pytest.mark.parametrize("kind", ["greedy", "sampled"])
@pytest.mark.parametrize("layout", ["data:8", "data:4,model:2", "data:2,model:4"])
def test_new_tokens_do_not_depend_on_the_layout(layouts, layout, kind):
    # the key streams are identical; only float reduction order could differ between layouts
    expected = new_tokens(layouts["single"], kind)
    assert all(len(row) == 24 for row in expected)
    assert all(len(set(row)) > 10 for row in expected)  # the rows wander: a mix-up would show
    assert new_tokens(layouts[layout], kind) == expected


def test_what_does_not_divide_stays_whole_and_samples_the_same(runs):
    odd = runs["odd"]
    params = odd["data:4,model:2"]["params"]
    assert params["attn.c_attn.weight"] == [] and params["attn.c_proj.weight"] == []  # 3 heads
    assert params["wte"] == []  # 65 rows
    assert params["mlp.c_fc.weight"] == ["model", "None"]  # 192 hidden units do divide
    for kind in ("greedy", "sampled"):
        expected = new_tokens(odd["single"], kind)
        assert all(len(set(row)) > 10 for row in expected)
        assert new_tokens(odd["data:4,model:2"], kind) == expected


def test_parameters_are_split_megatron_style(layouts):
    params = layouts["data:4,model:2"]["params"]
    assert params["attn.c_attn.shape"] == [3, 64, 64]  # query, key, value of a head together
    assert params["attn.c_attn.weight"] == ["None", "model", "None"]  # column-parallel heads
    assert params["attn.c_proj.weight"] == ["None", "model"]  # row-parallel over heads
    assert params["mlp.c_fc.weight"] == ["model", "None"]  # column-parallel hidden units
    assert params["mlp.c_proj.weight"] == ["None", "model"]  # row-parallel hidden units
    assert params["wte"] == ["model", "None"]  # over the vocabulary
    assert params["wpe"] == [] and params["ln_1"] == []  # replicated


def test_data_parallel_replicates_parameters_and_splits_the_cache(layouts):
    assert all(
        spec == []
        for key, spec in layouts["data:8"]["params"].items()
        if key != "attn.c_attn.shape"
    )
    assert layouts["data:8"]["cache"][0] == "data" and "model" not in layouts["data:8"]["cache"]
    assert layouts["data:4,model:2"]["cache"][:2] == ["data", "model"]  # the cache follows heads
    assert layouts["data:4,model:2"]["cache_shape"][:2] == [8, 4]  # (B, H, S, D)


def test_two_processes_print_what_one_prints(checkpoint):
    """jax.distributed over two local processes of 4 CPU devices each, mesh data:4,model:2."""
    flags = [
        f"--init_from={checkpoint}",
        "--start=ROMEO:",
        "--num_samples=4",
        "--seed=4",
        "--max_new_tokens=20",
        "--top_k=10",
    ]
    single = run_script("sample", *flags)
    assert single.returncode == 0, single.stderr
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [
        subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "sample.py"), *flags, "--mesh=data:4,model:2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={
                **os.environ,
                "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][1] + outputs[1][1]
    assert outputs[0][0] == single.stdout  # process 0 prints the samples
    assert outputs[1][0] == ""  # the other process prints nothing
