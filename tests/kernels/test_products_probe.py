"""scripts/products_probe.py, on the tiny shape: a row per dtype and batch size, both ways."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "products_probe.py"


def test_the_probe_times_both_ways_for_every_dtype_and_batch():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model=tiny", "--batch_sizes=1,3", "--rounds=2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [
        ("float32", "1"),
        ("float32", "3"),
        ("bfloat16", "1"),
        ("bfloat16", "3"),
    ]
    for row in rows:  # two rounds each way, two medians, their ratio
        assert len(row) == 2 + 2 + 2 + 2 + 1
        assert all(float(ms) > 0 for ms in row[2:8])
        assert re.fullmatch(r"\d+\.\d\dx", row[8])
