"""Builds this folder's C++ kernels on first use, for this machine, and registers them with XLA.

A kernel is compiled by the system's C++ compiler against the FFI headers of the installed
jaxlib (`-O3 -march=native`: the CPU's own vector width and instructions) into the cache
directory, under a name derived from the source, the compiler, jaxlib and the CPU, so a later
process loads it in milliseconds. Without a compiler, on a failed build, or with
NANOGPT_JAX_KERNELS=0, `available` is False and callers use XLA's own operations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from nanogpt_jax.home import cache_home

SOURCES = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-pthread")


def enabled() -> bool:
    """False when NANOGPT_JAX_KERNELS=0: XLA's operations only (read when a program is traced)."""
    return os.environ.get("NANOGPT_JAX_KERNELS", "1") != "0"


@functools.cache
def cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and its flags (read once a process:
    `rows_times.applies` asks at every product it traces)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cpu_has(flag: str) -> bool:
    """Whether the CPU lists `flag` (e.g. "avx512vl") among its features in /proc/cpuinfo."""
    return flag in cpu_signature().split()


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(name: str) -> Path | None:
    """The shared library of kernels/NAME.cc, compiled now unless an identical build exists."""
    cxx = compiler()
    if cxx is None:
        return None
    source = SOURCES / f"{name}.cc"
    headers = [h.read_text() for h in sorted(SOURCES.glob("*.h"))]  # what the sources include
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join(
            [
                source.read_text(),
                *headers,
                version,
                jax.__version__,
                include,
                cpu_signature(),
                *FLAGS,
            ]
        ).encode()
    ).hexdigest()[:16]
    library = cache_home() / "kernels" / f"{name}-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final name, then renamed: another process never loads half a file
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run(
            [cxx, *FLAGS, f"-I{SOURCES}", f"-I{include}", str(source), "-o", str(built)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            print(
                f"note: could not build the {name} kernel ({cxx}), using XLA's operations: "
                f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}",
                file=sys.stderr,
            )
            return None
        os.replace(built, library)
    return library


@functools.cache
def register(name: str, symbol: str) -> bool:
    """Build kernels/NAME.cc and register its handler SYMBOL as the CPU FFI target NAME, once
    per process; False if it cannot be built."""
    try:
        library = build(name)
        if library is None:
            return False
        handler = getattr(ctypes.cdll.LoadLibrary(str(library)), symbol)
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        note = f"note: could not build the {name} kernel, using XLA's operations: {e}"
        print(note, file=sys.stderr)
        return False
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def available(name: str, symbol: str) -> bool:
    """Whether kernel NAME may be used here: on a CPU, enabled and built."""
    return jax.default_backend() == "cpu" and enabled() and register(name, symbol)
