"""The benchmark harness on a tiny shape (a smoke test, not a measurement), and the pieces whose
mistakes would make its numbers lie: the no-cache baseline and the Hugging Face export."""

import csv
import json

import jax
import numpy as np
import pytest
import torch
from conftest import (
    SMALL_VOCAB_SPREAD,
    assert_logits_close,
    assert_one_line_error,
    distinct_new,
    run_script,
    spread_model,
)
from flax import nnx

from nanogpt_jax.bench.nocache import generate_nocache, window_plan
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.interop.torch_reference import from_params
from nanogpt_jax.kernels import decode_attention, rows_times
from nanogpt_jax.sampling import SamplingParams

CPU_IMPLS = "jax,jax-nocache,torch-nanogpt,hf"


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    result = run_script(
        "bench",
        "--model=tiny",
        "--batch_sizes=1,2",
        "--prompt_len=8",
        "--new_tokens=6",
        "--repeats=1",
        "--check_steps=16",
        f"--impls={CPU_IMPLS}",
        f"--out={out}",
        "--profile",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "agree: True" in result.stdout

    report = json.loads((out / "results.json").read_text())
    assert report["agree"] is True
    assert report["agreement"]["steps"] == 16
    hardware = report["hardware"]
    assert hardware["bandwidth_gbs"] > 0 and hardware["matmul_tflops"] > 0
    # a decode step reads: its floor uses the read rate, not the update's read + write bytes
    assert hardware["bandwidth_gbs"] == hardware["read_gbs"] and hardware["copy_gbs"] > 0
    # the read rate: the fastest of the read programs, the products kernel among them if built
    programs = ["sum", "matvec"] + (["kernel"] if rows_times.built() else [])
    rates = {p: hardware[f"read_{p}_gbs"] for p in programs}
    assert min(rates.values()) > 0 and hardware["read_gbs"] == max(rates.values()), hardware
    # the weight products' bound: once per batch size, in XLA and in torch
    bounds = {b["batch_size"]: b for b in report["bounds"]}
    assert set(bounds) == {1, 2}, bounds
    for b in bounds.values():
        assert b["bound_ms"] == min(b["xla_ms"], b["torch_ms"]) > 0
        assert b["bound_library"] in ("xla", "torch")
    rows = report["results"]
    assert {(r["impl"], r["batch_size"]) for r in rows} == {
        (impl, b) for impl in CPU_IMPLS.split(",") for b in (1, 2)
    }
    for row in rows:
        for column in ("tok_s", "ttft_s", "floor_ms_per_token", "total_s"):
            assert row[column] > 0, (row["impl"], column)
        assert row["agree_steps"] == 6, row["impl"]  # float32: same tokens as jax
        assert ("fraction_of_floor" in row) and ("ms_per_token" in row)
        assert row["bound_ms_per_token"] > 0, row["impl"]
        # each cell's floor at the read rate measured next to it, the same for its rows
        cell = [r for r in rows if r["batch_size"] == row["batch_size"]]
        assert row["read_gbs"] > 0 and {r["read_gbs"] for r in cell} == {row["read_gbs"]}
        assert row["ms_per_token"] is None or row["fraction_of_bound"] > 0, row["impl"]
    assert rows[0]["compile_s"] > 0  # the jax engine compiled, and said how long it took
    for row in rows:  # --profile traced every row once more
        assert row["ops_per_step"] > 0 and row["busy_ms_per_step"] > 0, row["impl"]
    breakdown = (out / "profile-jax-greedy-b2-p8-n6.txt").read_text()
    # a batch-2 step's products and attention run in the native kernels where they are built
    kernels = decode_attention.available() and rows_times.built()
    assert "device ops per step" in breakdown
    assert ("\nffi_call " if kernels else "\ndot ") in breakdown
    assert "\naten::addmm " in (out / "profile-hf-greedy-b2-p8-n6.txt").read_text()
    heading = result.stdout.splitlines()[1]
    assert "ops/step" in heading and "busy ms" in heading and "scaling" not in heading
    assert "of bound" in heading

    with open(out / "results.csv") as f:
        header = next(csv.reader(f))
    for column in ("impl", "batch_size", "tok_s", "ms_per_token", "ttft_s", "compile_s"):
        assert column in header
    assert "floor_ms_per_token" in header and "fraction_of_floor" in header
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_mesh_reports_scaling_efficiency(tmp_path):
    out = tmp_path / "bench"
    result = run_script(
        "bench",
        "--model=tiny",
        "--batch_sizes=4",
        "--prompt_len=8",
        "--new_tokens=6",
        "--repeats=1",
        "--impls=jax",
        "--mesh=data:2,model:2",
        f"--out={out}",
        timeout=300,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    assert report["agreement"]["impls"]["jax-mesh"]["agree"] is True  # float32: same tokens
    one, mesh = report["results"]
    assert (one["impl"], one["devices"], one["scaling_efficiency"]) == ("jax", 1, None)
    assert (mesh["impl"], mesh["devices"], mesh["agree_steps"]) == ("jax-mesh", 4, 6)
    assert mesh["scaling_efficiency"] == pytest.approx(mesh["tok_s"] / (4 * one["tok_s"]))
    assert "scaling" in result.stdout.splitlines()[1]  # the table's heading


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--mesh=data:64"], "needs 64 devices"),
        (["--mesh=pipeline:2"], "data:N,model:M"),
        (["--batch_sizes=1,x"], "--batch_sizes"),
        (["--impls=jax,tensorflow"], "unknown impl"),
        (["--new_tokens=100"], "block_size"),
        (["--device=tpu3"], "device"),
        (["--repeats"], "needs a value"),
    ],
)
def test_bench_bad_flags(argv, fragment):
    result = run_script("bench", "--model=tiny", *argv, timeout=120)
    assert_one_line_error(result, fragment)


@pytest.mark.parametrize("prompt_len, num_new", [(5, 30), (3, 1), (12, 9)])
def test_recompute_matches_nanogpt_generate(prompt_len, num_new):
    """The jitted no-cache baseline is nanoGPT's loop, cropping at block_size included."""
    config = GPTConfig(
        block_size=20, vocab_size=300, n_layer=2, n_head=2, n_embd=32, activation_function="gelu"
    )
    model, params = spread_model(config, scale=SMALL_VOCAB_SPREAD)
    prompts = np.random.default_rng(0).integers(0, 300, (3, prompt_len))
    graphdef, state = nnx.split(model)

    def nocache(**sampling):
        tokens = generate_nocache(
            graphdef,
            state,
            jax.numpy.asarray(prompts),
            SamplingParams.create(**sampling),
            seed=4,
            num_new=num_new,
            vocab_size=300,
        )
        return np.asarray(tokens)

    ours = nocache(temperature=0.0)
    theirs = from_params(config, params).generate(torch.from_numpy(prompts), num_new, temperature=0)
    np.testing.assert_array_equal(ours, theirs[:, prompt_len:].numpy())
    if num_new >= 30:  # the continuation wanders: a decoder mixing up positions shows
        assert all(distinct_new(row, 0) > 10 for row in ours)
        # it draws too, with the engine's sampler: top_k=1 is greedy, a plain draw is not
        np.testing.assert_array_equal(nocache(temperature=1.0, top_k=1), ours)
        assert not np.array_equal(nocache(temperature=1.0), ours)


def test_window_plan_covers_every_step_once():
    plan = window_plan(prompt_len=16, num_new=256, block_size=1024)
    assert [(first, end) for first, end, _ in plan] == [
        (0, 1),
        (1, 17),
        (17, 49),
        (49, 113),
        (113, 241),
        (241, 256),
    ]
    for _, end, width in plan:
        assert 16 + end - 1 <= width  # the longest context of the run fits its window
    assert max(width for *_, width in window_plan(5, 30, 20)) == 20  # never past block_size


@pytest.mark.parametrize("bias, activation", [(True, "gelu_new"), (False, "gelu")])
def test_hf_export_logits_match(bias, activation):
    from nanogpt_jax.interop.hf_model import to_hf

    config = GPTConfig(
        block_size=16,
        vocab_size=300,
        n_layer=2,
        n_head=2,
        n_embd=32,
        bias=bias,
        activation_function=activation,
    )
    model, params = spread_model(config, scale=SMALL_VOCAB_SPREAD)
    ids = np.random.default_rng(1).integers(0, 300, (2, 10))
    ours, _ = model(jax.numpy.asarray(ids))
    hf = to_hf(config, params)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    assert_logits_close(ours, theirs)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied


def test_the_headline_picks_the_fastest_pytorch_row():
    from nanogpt_jax.bench.run import headline

    def row(impl, tok_s, sampling="greedy", batch=1):
        return dict(impl=impl, tok_s=tok_s, sampling=sampling, batch_size=batch)

    cell = dict(prompt_len=16, new_tokens=256)
    rows = [
        row("jax", 100.0),
        row("jax-nocache", 500.0),  # JAX, not PyTorch: never the yardstick
        row("torch-nanogpt", 20.0),
        row("torch-fast", 80.0),
        row("hf", 40.0),
        row("hf-static", None),  # failed: no tokens/s
        row("jax", 30.0, sampling="nanogpt"),
        row("hf-static", 60.0, sampling="nanogpt"),
        row("torch-fast", 50.0, sampling="nanogpt"),
        row("jax", 10.0, batch=8),  # a cell without PyTorch rows has no headline
    ]
    lines = headline([r | cell for r in rows])
    assert [(h["sampling"], h["best_pytorch"], h["jax_over_best_pytorch"]) for h in lines] == [
        ("greedy", "torch-fast", 100.0 / 80.0),
        ("nanogpt", "hf-static", 30.0 / 60.0),
    ]


def test_bench_races_torch_fast_and_hf_static_sampled_too(tmp_path):
    out = tmp_path / "bench"
    result = run_script(
        "bench",
        "--model=tiny",
        "--batch_sizes=1",
        "--prompt_lens=8",
        "--new_tokens=4",
        "--repeats=1",
        "--check_steps=8",
        "--impls=jax,torch-fast,hf-static",
        "--sampling=both",
        "--torch_cpu_variants=eager,compiled",  # the default's Inductor options compile longer
        f"--out={out}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    impls = ("jax", "torch-fast", "hf-static")
    rows = {(r["impl"], r["sampling"]): r for r in report["results"]}
    assert set(rows) == {(i, s) for i in impls for s in ("greedy", "nanogpt")}
    assert all(r["tok_s"] > 0 for r in rows.values()), rows
    assert rows[("jax", "greedy")]["compile_s"] > 0
    for impl in ("torch-fast", "hf-static"):  # reported like the engine's (0 when eager won)
        assert all(isinstance(rows[(impl, s)]["compile_s"], float) for s in ("greedy", "nanogpt"))
    assert rows[("torch-fast", "greedy")]["agree_steps"] == 4  # the engine's tokens
    assert all(rows[(i, "nanogpt")]["valid_ids"] for i in impls)
    assert rows[("hf-static", "greedy")]["variant"] in ("eager", "compiled")
    assert rows[("torch-fast", "nanogpt")]["variant"] in ("eager", "compiled")
    assert {h["sampling"] for h in report["headline"]} == {"greedy", "nanogpt"}
    assert "jax / best PyTorch (" in result.stdout
    with open(out / "results.csv") as f:
        jax_rows = [r for r in csv.DictReader(f) if r["impl"] == "jax"]
    assert all(r["best_pytorch"] in ("torch-fast", "hf-static") for r in jax_rows)


def test_max_seconds_skips_only_no_cache_runs():
    """A cached implementation's time cannot be told from its first token (a long prompt's
    prefill costs far more than a step): only the no-cache ones are estimated and skipped."""
    from nanogpt_jax.bench.implementations import Implementation
    from nanogpt_jax.bench.run import Settings, time_runs

    class Instant(Implementation):
        name, compile_seconds = "instant", 0.0

        def __init__(self, recomputes: bool):
            self.recomputes = recomputes

        def generate(self, prompts, num_new):
            return np.zeros((prompts.shape[0], num_new), np.int64)

    prompts = np.zeros((1, 4), np.int64)
    settings = Settings(repeats=1, max_seconds=1e-12)
    assert "max_seconds" in time_runs(Instant(recomputes=True), prompts, 8, settings)["skipped"]
    row = time_runs(Instant(recomputes=False), prompts, 8, settings)
    assert "skipped" not in row and row["tok_s"] > 0


def test_max_seconds_estimates_a_no_cache_run_from_its_longest_step():
    """A no-cache step grows faster than its context (attention is quadratic, and short
    passes are overhead): the estimate times a step at the longest context too, not only the
    first. nanoGPT's loop in PyTorch is estimated as well (it once ran unestimated)."""
    import time

    from nanogpt_jax.bench.implementations import Implementation, TorchNanoGPT
    from nanogpt_jax.bench.run import Settings, time_runs

    class Quadratic(Implementation):
        name, compile_seconds, recomputes = "quadratic", 0.0, True

        def generate(self, prompts, num_new):
            time.sleep(1e-4 * prompts.shape[1] ** 2)
            return np.zeros((prompts.shape[0], num_new), np.int64)

    # first step >= 1.6 ms, last (11 tokens) >= 12.1 ms: 8 steps >= 55 ms, where scaling the
    # first step by the context's growth (4 -> 7.5 tokens on average) would say 24 ms
    prompts = np.zeros((1, 4), np.int64)
    row = time_runs(Quadratic(), prompts, 8, Settings(repeats=1, max_seconds=0.04))
    assert "max_seconds" in row["skipped"]
    assert TorchNanoGPT.recomputes
