"""Serve a model over OpenAI's completions API, with continuous batching.

python scripts/serve.py --init_from=shakespeare-char
python scripts/serve.py --init_from=gpt2 --slots=32 --port=8080

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`.
Logs go to stderr, one line per request; SIGTERM (or Ctrl-C) finishes the requests in flight
and exits.
"""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from nanogpt_jax.commands import load_model, run, select_platform
from nanogpt_jax.errors import UserError
from nanogpt_jax.extras import require
from nanogpt_jax.flags import flag, parse_flags


@dataclass
class ServeFlags:
    init_from: str = flag(
        "resume",
        "resume | gpt2 ... gpt2-xl | shakespeare-char | a checkpoint | PyTorch weights | "
        "random:gpt2 (GPT-2's shape with random weights, for benchmarks)",
    )
    out_dir: str = flag("out", "the checkpoint read by --init_from=resume")
    model_name: str | None = flag(None, "the model's name in the API (default: --init_from's)")
    host: str = flag("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = flag(8000, "port to listen on")
    slots: int = flag(16, "rows decoded together; more requests wait for a free one")
    max_queue: int = flag(256, "requests waiting for a slot before new ones get a 503")
    max_tokens_default: int = flag(16, "max_tokens of a request that gives none (OpenAI's)")
    decode_steps: int = flag(2, "decode steps between two looks for finished and new requests")
    device: str | None = flag(None, "cpu | gpu | tpu, or cuda:1 (default: JAX's default backend)")
    dtype: str | None = flag(None, "float32 | bfloat16 | float16 (default: float32 on cpu)")
    mesh: str | None = flag(None, "e.g. data:4,model:2 over all devices (default: one device)")
    verify: bool = flag(False, "check the checkpoint's SHA-256 digests before loading it")
    meta: str | None = flag(None, "a nanoGPT ckpt.pt's meta.pkl (default: where nanoGPT looks)")


USAGE = "usage: python scripts/serve.py [--key=value ...]"


def main(argv: list[str]) -> None:
    flags = parse_flags(ServeFlags, argv, usage=USAGE)
    for name in ("slots", "max_queue", "max_tokens_default", "decode_steps"):
        if getattr(flags, name) < (2 if name == "slots" else 1):
            raise UserError(f"{name} must be at least {2 if name == 'slots' else 1}")
    if not 0 < flags.port < 65536:
        raise UserError(f"port must be in 1..65535, got {flags.port}")
    uvicorn = require("uvicorn", "the server")
    require("fastapi", "the server")
    require("prometheus_client", "the server")
    check_address(flags.host, flags.port)  # before minutes of loading and compiling
    select_platform(flags.device)
    import jax

    from nanogpt_jax.serve.app import create_app
    from nanogpt_jax.serve.metrics import Metrics
    from nanogpt_jax.serve.scheduler import Scheduler
    from nanogpt_jax.sharding import make_mesh

    dtype = flags.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    source = flags.out_dir if flags.init_from == "resume" else flags.init_from
    if flags.init_from == "resume" and not Path(source).is_dir():
        raise UserError(f"--init_from=resume: no checkpoint directory {source!r} (see --out_dir)")
    mesh = make_mesh(flags.mesh) if flags.mesh else None
    bundle = load_model(source, dtype, mesh, verify=flags.verify, meta=flags.meta)
    scheduler = Scheduler(
        bundle, flags.slots, flags.max_queue, flags.decode_steps, Metrics.create()
    )
    name = flags.model_name or source
    app = create_app(scheduler, name, flags.max_tokens_default)
    print(
        f"serving {name} ({bundle.config.n_layer} layers, {dtype}) on "
        f"http://{flags.host}:{flags.port}/v1 with {flags.slots} slots; compiling first",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app, host=flags.host, port=flags.port, log_level="warning", timeout_graceful_shutdown=600
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM, then raises the signal again for whatever handler was there
    # before it: after a finished drain that is this one, and the exit status stays 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:  # taken between the check and now
        raise UserError(f"could not listen on {flags.host}:{flags.port}")


def check_address(host: str, port: int) -> None:
    """A one-line error now if the address cannot be listened on (taken, or not this host's)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def entry_point() -> None:
    run(main)


if __name__ == "__main__":
    entry_point()
