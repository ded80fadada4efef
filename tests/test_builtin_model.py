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

TOLERANCE = 0.05


@pytest.fixture(scope="module")
def builtin():
    return nanogpt_jax.load("shakespeare-char")


def test_val_loss_matches_the_recorded_figure(builtin):
    info = builtin.info
    assert "scripts/train.py" in info["command"]
    measured = val_loss(builtin, SHAKESPEARE.read_text())
    print(f"built-in model val loss {measured:.4f}, recorded {info['val_loss']}")
    assert abs(measured - info["val_loss"]) <= TOLERANCE


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
