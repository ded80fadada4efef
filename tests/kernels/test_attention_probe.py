"""scripts/attention_probe.py, on a small shape: a row per batch size and case, every way."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "attention_probe.py"


@pytest.mark.parametrize("cache", ["float32", "bfloat16"])
def test_the_probe_times_every_way_for_every_case(cache):
    args = ["--batch_sizes=1,2", "--cases=256:40,384:300", "--layers=2", "--heads=2"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--head_dim=16", "--repeats=2", f"--cache={cache}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith(f"a {cache} cache")
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [(row[0], row[1], row[2], row[3]) for row in rows] == [
        ("1", "256", "40", "1/2"),
        ("1", "384", "300", "3/3"),
        ("2", "256", "40", "1/2"),
        ("2", "384", "300", "3/3"),
    ]
    for row in rows:  # the block loop, the single product, the native kernel (built in tests)
        assert len(row) == 7 and all(float(ms) > 0 for ms in row[4:])
