"""PyTorch -> Flax conversion: logits parity with Hugging Face GPT-2 and nanoGPT, round trips,
and clear errors for bad sources."""

import dataclasses
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from conftest import (
    LOGIT_TOLERANCE,
    assert_logits_close,
    assert_one_line_error,
    hf_gpt2,
    max_abs_diff,
    relative_logit_error,
    run_script,
    write_hub_layout,
    write_nanogpt_run,
)

import nanogpt_jax
from nanogpt_jax.bundle import make_bundle
from nanogpt_jax.checkpoint import METADATA_FILE, load_params, read_metadata, save_model
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.interop.convert import convert
from nanogpt_jax.tokenizer import CharTokenizer


def torch_logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor(ids))
    return (out.logits if hasattr(out, "logits") else out).numpy()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(activation_function="gelu_new"),
        dict(activation_function="gelu"),
        dict(n_head=3, n_embd=48),  # three heads of 16
        dict(n_head=5, n_embd=40, n_layer=3),  # an odd head count
    ],
    ids=["gelu_new", "gelu", "3-heads", "5-heads"],
)
def test_hf_logits_match_transformers(tmp_path, overrides):
    model = hf_gpt2(seed=1, **overrides)
    model.save_pretrained(tmp_path)  # recent transformers: `transformer.` keys, no lm_head
    converted = convert(str(tmp_path))
    assert converted.config.activation_function == overrides.get("activation_function", "gelu_new")
    bundle = make_bundle(converted.config, converted.tokenizer, converted.params)
    ids = np.random.default_rng(0).integers(0, 50257, (3, 40))
    reference = torch_logits(model, ids)
    error = assert_logits_close(bundle.logits(ids), reference)
    print(f"logit error vs transformers {overrides}: {error:.2e} of the logit scale")
    # the control: the same weights under the other GELU must be told apart
    other = {"gelu": "gelu_new", "gelu_new": "gelu"}[converted.config.activation_function]
    wrong = dataclasses.replace(converted.config, activation_function=other)
    wrong_bundle = make_bundle(wrong, converted.tokenizer, converted.params)
    assert relative_logit_error(wrong_bundle.logits(ids), reference) > 10 * LOGIT_TOLERANCE


def test_gpt2_124m_shape_logits_match_transformers():
    """The full GPT-2 (124M) shape at its own random init: 12 layers, 12 heads of 64, 1024
    positions, the whole 50257-token vocabulary, 256 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nanogpt_jax.interop.convert import config_from_hf, from_state_dict
    from nanogpt_jax.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = config_from_hf(model.config.to_dict(), "GPT2Config()")
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (12, 12, 768, 1024)
    converted = from_state_dict(
        tensors, config, GPT2Tokenizer(), linear_layout="conv1d", source="GPT2Config()"
    )
    bundle = make_bundle(converted.config, converted.tokenizer, converted.params)
    ids = np.random.default_rng(5).integers(0, 50257, (1, 256))
    reference = torch_logits(model, ids)
    error = assert_logits_close(bundle.logits(ids), reference)
    print(
        f"GPT-2 124M shape: max |logit diff| {max_abs_diff(bundle.logits(ids), reference):.1e}, "
        f"max |logit| {np.abs(reference).max():.2f}, {error:.1e} of the logit scale"
    )


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    """ckpt.pt is read with torch.load(weights_only=True): a file whose unpickling would call
    a function is a one-line error, and the function never runs."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"model": Payload(), "model_args": {}}, evil / "ckpt.pt")
    result = run_script("convert", f"--from={evil / 'ckpt.pt'}", f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "ckpt.pt", "not a readable PyTorch weights file")
    sampled = run_script("sample", f"--init_from={evil}", "--max_new_tokens=2")
    assert_one_line_error(sampled, "ckpt.pt")
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the control: unpickled without weights_only, the file does run its code
    torch.load(evil / "ckpt.pt", weights_only=False)
    assert marker.exists()


def test_hub_layout_and_pytorch_bin_convert_identically(tmp_path):
    model = hf_gpt2(seed=2)
    hub = write_hub_layout(model, tmp_path / "hub")
    # an older pytorch_model.bin: hub-style names and buffers, pickled by torch
    (tmp_path / "bin").mkdir()
    model.config.to_json_file(tmp_path / "bin" / "config.json")
    from safetensors.torch import load_file

    torch.save(load_file(hub / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    from_hub, from_bin = convert(str(hub)), convert(str(tmp_path / "bin"))
    ids = np.random.default_rng(1).integers(0, 50257, (2, 64))
    reference = torch_logits(model, ids)
    for converted in (from_hub, from_bin):
        bundle = make_bundle(converted.config, converted.tokenizer, converted.params)
        assert_logits_close(bundle.logits(ids), reference)


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_checkpoint_matches_torch(tmp_path, shakespeare_chars, bias):
    config = GPTConfig(block_size=48, vocab_size=96, n_layer=2, n_head=3, n_embd=48, bias=bias)
    run = write_nanogpt_run(tmp_path, config, chars=shakespeare_chars)
    torch_model = run.model
    converted = convert(str(run.ckpt), meta=str(run.meta))
    assert converted.config.bias is bias
    assert converted.config.activation_function == "gelu"  # nanoGPT trains with exact GELU
    assert isinstance(converted.tokenizer, CharTokenizer)
    assert converted.tokenizer.vocab_size == 65 < converted.config.vocab_size
    path = save_model(tmp_path / "out", converted.params, converted.config, converted.tokenizer)
    bundle = nanogpt_jax.load(path)
    ids = np.random.default_rng(2).integers(0, 96, (2, 48))
    error = assert_logits_close(bundle.logits(ids), torch_logits(torch_model, ids))
    print(f"logit error vs torch nanoGPT (bias={bias}): {error:.2e} of the logit scale")
    assert bundle.tokenizer.decode(bundle.tokenizer.encode("ROMEO:")) == "ROMEO:"


def test_round_trip_is_bit_identical(tmp_path):
    model = hf_gpt2(seed=3)
    model.save_pretrained(tmp_path / "hf")
    converted = convert(str(tmp_path / "hf"))
    path = save_model(tmp_path / "ckpt", converted.params, converted.config, converted.tokenizer)
    config, tokenizer, _ = read_metadata(path)
    assert config == converted.config
    restored = load_params(path, config)
    flat_a = dict(_flatten(converted.params))
    flat_b = dict(_flatten(restored))
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        assert np.array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name])), name
    # the HF weights themselves survive exactly (Conv1D stores the transpose of ours)
    hf_weight = model.transformer.h[1].mlp.c_fc.weight.detach().numpy()
    assert np.array_equal(np.asarray(restored["h"][1]["mlp"]["c_fc"]["weight"]), hf_weight.T)


def test_plain_orbax_restores_the_params(tmp_path):
    model = hf_gpt2(seed=4)
    model.save_pretrained(tmp_path / "hf")
    converted = convert(str(tmp_path / "hf"))
    path = save_model(tmp_path / "ckpt", converted.params, converted.config, converted.tokenizer)
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(path / "params")
    wte = np.asarray(tree["wte"]["embedding"])
    assert np.array_equal(wte, model.transformer.wte.weight.detach().numpy())
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["config"]["n_layer"] == 2 and meta["tokenizer"]["kind"] == "gpt2"


def test_shape_mismatch_names_the_tensor(tmp_path):
    model = hf_gpt2(seed=5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 64  # the weights are 32 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"shape mismatch for h\.0\.attn\.c_attn\.bias: .*\(96,\)"):
        convert(str(tmp_path))


def test_untied_lm_head_is_refused(tmp_path):
    model = hf_gpt2(seed=6)
    hub = write_hub_layout(model, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(hub / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    save_file(state, hub / "model.safetensors")
    with pytest.raises(UserError, match="untied"):
        convert(str(hub))


def test_convert_cli_writes_a_loadable_checkpoint(tmp_path, shakespeare_chars):
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16)
    run = write_nanogpt_run(tmp_path / "nanogpt", config, chars=shakespeare_chars)
    # from nanoGPT's folder, as nanoGPT's sample.py runs: data/<dataset>/meta.pkl is found
    result = run_script(
        "convert", f"--from={run.ckpt}", f"--out_dir={tmp_path / 'ckpt'}", cwd=run.root
    )
    assert result.returncode == 0, result.stderr
    assert "vocabulary: data/shakespeare_char/meta.pkl (65 characters)" in result.stderr
    assert result.stdout.strip() == str(tmp_path / "ckpt")
    bundle = nanogpt_jax.load(tmp_path / "ckpt")
    assert bundle.config.vocab_size == 65 and bundle.tokenizer.vocab_size == 65

    # the same conversion again replaces the checkpoint only when told to
    again = [f"--from={run.ckpt}", f"--out_dir={tmp_path / 'ckpt'}", f"--meta={run.meta}"]
    assert_one_line_error(run_script("convert", *again), "--force")
    forced = run_script("convert", *again, "--force")
    assert forced.returncode == 0, forced.stderr
    assert nanogpt_jax.load(tmp_path / "ckpt").config == bundle.config


def test_load_converts_pytorch_weights_in_memory(gpt2_checkpoint):
    """A Hugging Face directory loads as the checkpoint converted from it, bit for bit."""
    path, _ = gpt2_checkpoint
    ids = np.arange(12).reshape(2, 6)
    saved = nanogpt_jax.load(path).logits(ids)
    direct = nanogpt_jax.load(path.parent / "hf").logits(ids)
    assert np.array_equal(np.asarray(saved), np.asarray(direct))


def test_export_to_nanogpt_loads_in_its_model_and_back(char_checkpoint, tmp_path):
    """--to=nanogpt writes what nanoGPT's sample.py loads: its GPT (our torch replica of it)
    gives our logits, and importing the files again gives our parameters bit for bit."""
    from nanogpt_jax.interop.torch_reference import GPT as TorchGPT

    out = tmp_path / "torch"
    result = run_script("convert", f"--from={char_checkpoint}", "--to=nanogpt", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    checkpoint = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    model = TorchGPT(GPTConfig(**checkpoint["model_args"], activation_function="gelu")).eval()
    model.load_state_dict(checkpoint["model"], strict=True)
    ids = np.random.default_rng(0).integers(0, 65, (2, 20))
    ours = nanogpt_jax.load(char_checkpoint)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).numpy()
    assert_logits_close(ours.logits(ids), theirs)
    assert CharTokenizer.from_meta_pkl(out / "meta.pkl").itos == ours.tokenizer.itos
    back = nanogpt_jax.load(out)
    assert np.array_equal(np.asarray(back.logits(ids)), np.asarray(ours.logits(ids)))

    again = run_script("convert", f"--from={char_checkpoint}", "--to=nanogpt", f"--out_dir={out}")
    assert_one_line_error(again, "--force")
    to_hf = run_script("convert", f"--from={char_checkpoint}", "--to=hf", f"--out_dir={out}x")
    assert_one_line_error(to_hf, "character-level")
    assert not (tmp_path / "torchx").exists()


def test_export_to_hf_loads_in_transformers(gpt2_checkpoint, tmp_path):
    from transformers import GPT2LMHeadModel

    path, _ = gpt2_checkpoint
    out = tmp_path / "hf"
    result = run_script("convert", f"--from={path}", "--to=hf", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    model = GPT2LMHeadModel.from_pretrained(out).eval()
    assert model.config.eos_token_id == 50256
    ids = np.random.default_rng(1).integers(0, 50257, (2, 16))
    ours = nanogpt_jax.load(path)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    assert_logits_close(ours.logits(ids), theirs)
    back = nanogpt_jax.load(out)
    assert np.array_equal(np.asarray(back.logits(ids)), np.asarray(ours.logits(ids)))


def test_convert_cli_bad_inputs(tmp_path, shakespeare_chars):
    missing = run_script("convert", f"--from={tmp_path / 'nope.pt'}", f"--out_dir={tmp_path / 'x'}")
    assert_one_line_error(missing, "nope.pt")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    wrong_format = run_script("convert", f"--from={junk}", f"--out_dir={tmp_path / 'x'}")
    assert_one_line_error(wrong_format, "junk.pt")

    unknown_preset = run_script("convert", "--from=gpt3", f"--out_dir={tmp_path / 'x'}")
    assert_one_line_error(unknown_preset, "gpt3", "gpt2-xl")

    hf = tmp_path / "hf"
    hf_gpt2(seed=7).save_pretrained(hf)
    config = json.loads((hf / "config.json").read_text())
    config["n_layer"] = 3
    (hf / "config.json").write_text(json.dumps(config))
    mismatch = run_script("convert", f"--from={hf}", f"--out_dir={tmp_path / 'x'}")
    assert_one_line_error(mismatch, "h.2.")

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16)
    run = write_nanogpt_run(tmp_path / "nanogpt", config, chars=shakespeare_chars)
    refused = run_script("convert", f"--from={run.ckpt}", f"--out_dir={existing}")
    assert_one_line_error(refused, "--force")
    assert (existing / "keep.txt").read_text() == "precious"

    unknown_flag = run_script("convert", "--form=gpt2", f"--out_dir={tmp_path / 'x'}")
    assert_one_line_error(unknown_flag, "--form")
    assert not (tmp_path / "x").exists()


def test_preset_download_fails_clearly_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once at import: an earlier test may have imported it already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="Hugging Face hub"):
        convert("gpt2")


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name)
        else:
            yield name, value
