"""Sizes and SHA-256 digests of the files a checkpoint wrote, so damage is named before Orbax
reads a byte: a read that fails halfway leaves Orbax's other reads running, each printing a
traceback of its own, and a truncated or bit-flipped file may otherwise load as wrong numbers.

    DIR/sha256sums.json   {"files": {"relative/path": {"bytes": N, "sha256": "..."}}}

Sizes are checked at every load (a `stat` per file); digests when asked (`verify`), and always
before a training run resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nanogpt_jax.errors import UserError

SUMS_FILE = "sha256sums.json"


def record_files(directory: Path) -> None:
    """Write DIR/sha256sums.json for every file below `directory` (call before the directory
    is renamed into place, so the record is as atomic as the files)."""
    files = {
        path.relative_to(directory).as_posix(): {
            "bytes": path.stat().st_size,
            "sha256": sha256_of(path),
        }
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != SUMS_FILE
    }
    temporary = directory / f".{SUMS_FILE}.partial"
    temporary.write_text(json.dumps({"files": files}, indent=1) + "\n")
    temporary.replace(directory / SUMS_FILE)


def check_files(directory: Path, *, verify: bool, prefix: str = "") -> bool:
    """Raise a UserError naming the first missing, resized or (with `verify`) changed file
    recorded in DIR/sha256sums.json under `prefix`. False when nothing was recorded."""
    path = directory / SUMS_FILE
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())
        # training runs of earlier versions kept {"path": "sha256"}, without sizes
        files = files["files"] if "files" in files else {k: {"sha256": v} for k, v in files.items()}
        assert all(isinstance(r, dict) and isinstance(r["sha256"], str) for r in files.values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, AssertionError):
        raise UserError(f"{path}: damaged checksum file") from None
    for name, record in files.items():
        if not name.startswith(prefix):
            continue
        file = directory / name
        if not file.is_file():
            raise UserError(f"{directory}: damaged checkpoint, {name} is missing")
        size = file.stat().st_size
        if size != record.get("bytes", size):
            raise UserError(
                f"{directory}: damaged checkpoint, {name} is {size} bytes "
                f"({record['bytes']} when written)"
            )
        if verify and sha256_of(file) != record["sha256"]:
            raise UserError(f"{directory}: damaged checkpoint, {name} has changed since written")
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
