"""The model shipped inside the package: it loads offline, samples, and still has the val loss
recorded when it was trained."""

import fnmatch
import re
from pathlib import Path

import pytest
from conftest import REPO, SHAKESPEARE, run_script

import nanogpt_jax
from nanogpt_jax.bundle import BUILTIN_DIR
from nanogpt_jax.training.export import val_loss

# The recorded figure is rounded to 4 decimals; float32 sums over 111,540 tokens in two
# libraries agree far closer than this.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def builtin():
    return nanogpt_jax.load("shakespeare-char")


def test_val_loss_matches_the_recorded_figure(builtin):
    info = builtin.info
    assert "scripts/train.py" in info["command"]
    measured = val_loss(builtin, SHAKESPEARE.read_text())
    print(f"built-in model val loss {measured:.5f}, recorded {info['val_loss']}")
    assert abs(measured - info["val_loss"]) <= TOLERANCE


def test_val_loss_recomputed_in_pytorch_from_the_exported_ckpt(builtin, tmp_path):
    """The independent reference: the model exported as nanoGPT's ckpt.pt + meta.pkl, run by
    nanoGPT's model in PyTorch over the val split nanoGPT's prepare.py makes (last 10%),
    in consecutive non-overlapping block_size windows."""
    import pickle

    import numpy as np
    import torch
    import torch.nn.functional as F

    from nanogpt_jax.config import GPTConfig
    from nanogpt_jax.interop.torch_reference import GPT as TorchGPT

    out = tmp_path / "nanogpt"
    result = run_script("convert", "--from=shakespeare-char", "--to=nanogpt", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    model = TorchGPT(GPTConfig(**checkpoint["model_args"], activation_function="gelu")).eval()
    model.load_state_dict(checkpoint["model"], strict=True)
    with open(out / "meta.pkl", "rb") as f:
        stoi = pickle.load(f)["stoi"]  # written by this test's own conversion just now
    text = SHAKESPEARE.read_text()
    val = np.array([stoi[c] for c in text[int(len(text) * 0.9) :]], np.int64)
    T = checkpoint["model_args"]["block_size"]
    count = (len(val) - 1) // T
    inputs = torch.from_numpy(val[: count * T].reshape(count, T))
    targets = torch.from_numpy(val[1 : count * T + 1].reshape(count, T))
    total = 0.0
    with torch.no_grad():
        for first in range(0, count, 64):
            logits = model(inputs[first : first + 64])
            total += F.cross_entropy(
                logits.flatten(0, 1), targets[first : first + 64].flatten(), reduction="sum"
            ).item()
    torch_loss = total / (count * T)
    print(f"val loss in PyTorch {torch_loss:.5f}, recorded {builtin.info['val_loss']}")
    assert abs(torch_loss - builtin.info["val_loss"]) <= TOLERANCE
    assert abs(torch_loss - val_loss(builtin, text)) <= 1e-4


def test_is_small_enough_to_ship(builtin):
    size = sum(p.stat().st_size for p in (BUILTIN_DIR / "shakespeare-char").rglob("*"))
    assert size < 5_000_000
    assert builtin.tokenizer.vocab_size == 65


def test_files_are_package_data():
    """pyproject's package-data globs must carry every file of the model into a wheel."""
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]")[1]
    globs = re.findall(r'"([^"]+)"', re.search(r"nanogpt_jax = \[(.*?)\]", section).group(1))
    package = REPO / "nanogpt_jax"
    files = [p for p in (BUILTIN_DIR / "shakespeare-char").rglob("*") if p.is_file()]
    assert files
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, glob) for glob in globs), relative


def test_sample_script_uses_it_offline():
    result = run_script(
        "sample",
        "--init_from=shakespeare-char",
        "--start=ROMEO:",
        "--num_samples=1",
        "--max_new_tokens=40",
        env={"HF_HUB_OFFLINE": "1", "https_proxy": "http://127.0.0.1:9"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:")
    assert Path(nanogpt_jax.__file__).parent / "pretrained" == BUILTIN_DIR
