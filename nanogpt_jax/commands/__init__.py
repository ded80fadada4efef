"""Command-line entry points. Each parses flags, wires library calls and prints: results on
stdout, everything else (progress, timings, warnings, errors) on stderr."""

import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

from nanogpt_jax.errors import UserError


def run(main, argv=None) -> None:
    """Run `main(argv)`, turning bad input into a one-line error and exit status 2."""
    warnings.showwarning = _one_line_warning
    # Orbax logs each failed background read or write, traceback and all, through absl, and
    # its abandoned asyncio tasks through asyncio; the failure also reaches the caller as an
    # exception, which ends here as one line
    for logger in ("absl", "asyncio"):
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    sys.unraisablehook = _quiet_closed_loops
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        sys.exit(0)


def reserve_stdout_for_results() -> None:
    """Point file descriptor 1 at stderr and keep the real stdout for Python's prints only:
    native libraries (gloo announces its connections there) then cannot mix into results."""
    sys.stdout.flush()
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = results


def _quiet_closed_loops(unraisable, default_hook=sys.unraisablehook) -> None:
    """Orbax's TensorStore callbacks still arriving for an asyncio loop that an aborted read
    or write closed, and its read coroutines collected with the failure they already raised:
    noise after (or before) the one-line error that says what happened."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    if any("/orbax/" in frame.filename for frame in frames):
        return
    default_hook(unraisable)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def read_text_file(path: Path, flag: str) -> str:
    """A UTF-8 text file named by `--flag`, or a one-line error saying what is wrong with it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--{flag}: no such file {path}") from None
    except IsADirectoryError:
        raise UserError(f"--{flag}: {path} is a directory") from None
    except UnicodeDecodeError:
        raise UserError(f"--{flag}: {path} is not UTF-8 text") from None


def select_platform(device: str | None) -> None:
    """Pin JAX to cpu/gpu/tpu before anything touches a backend; `cuda:1` (nanoGPT's way of
    naming a GPU) also makes that device the default one."""
    if device is None:
        return
    match = re.fullmatch(r"(cpu|gpu|cuda|tpu)(?::(\d+))?", device)
    if match is None:
        raise UserError(f"device must be cpu, gpu or tpu, optionally :N (cuda:1), got {device!r}")
    platform, index = match.group(1), match.group(2)
    import jax

    jax.config.update("jax_platforms", "cuda" if platform == "gpu" else platform)
    try:
        devices = jax.devices()
    except RuntimeError as e:
        raise UserError(f"device {device!r} is not available here ({e})") from None
    except AssertionError:  # what jax raises when no backend of that platform initialised
        raise UserError(
            f"device {device!r} is not available here (no {platform} backend: no such device, "
            "or a jax without its plugin; `python -c 'import jax; print(jax.devices())'` lists "
            "what there is)"
        ) from None
    if index is not None:
        if int(index) >= len(devices):
            raise UserError(f"device {device!r}: there are {len(devices)} {platform} devices")
        jax.config.update("jax_default_device", devices[int(index)])


def load_model(source: str, dtype: str, mesh=None, **options):
    """The bundle `--init_from` names: anything `nanogpt_jax.load` reads, or `random:SHAPE`
    (GPT-2's random initialisation of a preset's shape, for benchmarks offline)."""
    if source.startswith("random:"):
        from nanogpt_jax.bench.run import random_bundle

        return random_bundle(source, dtype, mesh)
    from nanogpt_jax.bundle import load

    return load(source, dtype=dtype, mesh=mesh, **options)
