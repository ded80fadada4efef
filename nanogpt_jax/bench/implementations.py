"""The text generators the benchmark races, behind one interface, all on the same weights.

    jax            this project's engine: prefill, then a jitted KV-cached decode scan
    jax-mesh       the same engine on a device mesh (`--mesh`), batch rows over `data`
    jax-nocache    this project's model, nanoGPT's algorithm (see `nanogpt_jax.bench.nocache`)
    torch-nanogpt  nanoGPT's model and `generate` in PyTorch, eager (no cache)
    torch-compile  the same under `torch.compile`
    hf             Hugging Face `GPT2LMHeadModel.generate`, KV cache

Every one decodes greedily and returns exactly `num_new` tokens per row as a numpy array, so
reading the result also waits for the device.
"""

from __future__ import annotations

import importlib.util
import time

import jax.numpy as jnp
import numpy as np

from nanogpt_jax.bundle import ModelBundle
from nanogpt_jax.config import GPTConfig

ALL_IMPLS = ("jax", "jax-nocache", "torch-nanogpt", "torch-compile", "hf")
DEFAULT_IMPLS = ("jax", "jax-nocache", "torch-nanogpt", "hf")
NEEDS = {"torch-nanogpt": ("torch",), "torch-compile": ("torch",), "hf": ("torch", "transformers")}


def available(name: str) -> bool:
    return all(importlib.util.find_spec(module) for module in NEEDS.get(name, ()))


class Implementation:
    """One generator. `compiles`: its first run of a new shape compiles; `recomputes`: its cost
    per token grows with the context (no cache); `compile_seconds`: compilation it timed
    itself, cumulative (None if it cannot tell)."""

    name: str
    compiles: bool = False
    recomputes: bool = False
    compile_seconds: float | None = None
    devices: int = 1

    def generate(self, prompts: np.ndarray, num_new: int) -> np.ndarray:
        """Greedy continuations (B, num_new) of prompts (B, P)."""
        raise NotImplementedError

    def reset_peak(self) -> None:
        """Start a new peak-memory measurement."""

    def peak_bytes(self, shape: tuple[int, int], num_new: int) -> int | None:
        """Peak device memory of runs of this shape since `reset_peak`, where known."""
        return None


def program_bytes(compiled) -> int | None:
    """Device memory a compiled XLA program needs at once: arguments, outputs, temporaries."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if stats is None:
        return None
    return getattr(stats, "peak_memory_in_bytes", 0) or (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


class JaxMemory:
    """Peak memory of JAX runs: the largest program a shape compiled, from XLA's memory
    analysis. (JAX's own high-water mark spans the whole process and cannot be reset.)"""

    sizes: dict  # (prompts shape, num_new) -> bytes

    def remember(self, key, programs) -> None:
        sizes = [b for b in map(program_bytes, programs) if b is not None]
        if sizes:
            self.sizes[key] = max([*sizes, self.sizes.get(key, 0)])

    def peak_bytes(self, shape, num_new):
        return self.sizes.get((tuple(shape), num_new))


class JaxEngine(JaxMemory, Implementation):
    name, compiles = "jax", True

    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        self.compile_seconds = 0.0
        self.sizes = {}
        if bundle.mesh is not None:
            self.name, self.devices = "jax-mesh", bundle.mesh.size

    def programs(self) -> dict:
        return getattr(self.bundle.engine, "programs", None) or {}

    def generate(self, prompts, num_new):
        known = set(self.programs())
        result = self.bundle.generate(
            prompts, max_new_tokens=num_new, temperature=0.0, batch_size=len(prompts)
        )
        self.compile_seconds += result.compile_seconds
        new = [program for key, program in self.programs().items() if key not in known]
        self.remember((prompts.shape, num_new), new)
        P = prompts.shape[1]
        if not np.all(result.lengths == P + num_new):
            raise RuntimeError(f"jax engine returned {result.lengths - P} tokens, not {num_new}")
        return result.tokens[:, P : P + num_new]


class JaxRecompute(JaxMemory, Implementation):
    name, compiles, recomputes = "jax-nocache", True, True

    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        self.programs = {}
        self.compile_seconds = 0.0
        self.sizes = {}

    def generate(self, prompts, num_new):
        from nanogpt_jax.bench.nocache import generate_greedy

        prompts = jnp.asarray(prompts, jnp.int32)
        key = (prompts.shape, num_new)
        if key not in self.programs:
            began = time.perf_counter()
            lowered = generate_greedy.lower(
                self.bundle.graphdef,
                self.bundle.params,
                prompts,
                num_new=num_new,
                vocab_size=self.bundle.tokenizer.vocab_size,
            )
            self.programs[key] = lowered.compile()
            self.compile_seconds += time.perf_counter() - began
            self.remember(key, [self.programs[key]])
        return np.asarray(self.programs[key](self.bundle.params, prompts))


class TorchMemory:
    """Peak memory of torch runs, from CUDA's allocator (none on CPU): this model's weights plus
    the most the runs allocated beyond what was allocated before them (other models' weights
    stay out)."""

    device: str
    model: object  # the torch.nn.Module whose weights count

    def reset_peak(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.allocated_before = torch.cuda.memory_allocated()

    def peak_bytes(self, shape, num_new):
        if self.device != "cuda":
            return None
        import torch

        torch.cuda.synchronize()
        grown = torch.cuda.max_memory_allocated() - self.allocated_before
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied: once
        return weights + grown


class TorchNanoGPT(TorchMemory, Implementation):
    name = "torch-nanogpt"

    def __init__(self, model, device: str, vocab_size: int, compiled: bool = False):
        import torch

        self.device = device
        self.vocab_size = vocab_size
        self.model = model
        self.module = torch.compile(model) if compiled else model
        if compiled:
            # context lengths change every step: recompiles happen inside the warm-up run
            self.name, self.compiles = "torch-compile", True

    def generate(self, prompts, num_new):
        import torch

        from nanogpt_jax.interop.torch_reference import GPT

        idx = torch.from_numpy(np.asarray(prompts, np.int64)).to(self.device)
        with torch.inference_mode():
            # called on the (possibly compiled) module, so its forward is the compiled one
            out = GPT.generate(self.module, idx, num_new, temperature=0, vocab_size=self.vocab_size)
        return out[:, prompts.shape[1] :].cpu().numpy()


class HuggingFace(TorchMemory, Implementation):
    name = "hf"

    def __init__(self, model, device: str):
        self.model = model
        self.device = device

    def generate(self, prompts, num_new):
        import torch

        idx = torch.from_numpy(np.asarray(prompts, np.int64)).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=idx,
                attention_mask=torch.ones_like(idx),
                max_new_tokens=num_new,
                do_sample=False,
                use_cache=True,
            )
        new = out[:, prompts.shape[1] :].cpu().numpy()
        if new.shape[1] != num_new:
            raise RuntimeError(f"hf generate returned {new.shape[1]} tokens, not {num_new}")
        return new


def torch_model(config: GPTConfig, params: dict, device: str, dtype: str):
    """nanoGPT's torch GPT holding `params`, on `device` in `dtype`."""
    import torch

    from nanogpt_jax.interop.torch_reference import GPT, state_dict_from_params

    with torch.device("meta"):  # no time spent on a random init that is overwritten
        model = GPT(config)
    model.load_state_dict(state_dict_from_params(params), strict=True, assign=True)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    model.transformer.wte.weight = model.lm_head.weight  # tie again after the copy
    return model.eval()


def build(
    names,
    bundle: ModelBundle,
    params: dict,
    device: str,
    dtype: str,
    mesh=None,
) -> dict[str, Implementation]:
    """The named implementations; `bundle` computes in `dtype`, `params` are float32 on host.

    device: "cpu" or "cuda" (torch's name). mesh: where `jax-mesh` runs.
    """
    from nanogpt_jax.bundle import make_bundle

    vocab_size = bundle.tokenizer.vocab_size
    impls = {}
    for name in names:
        if name == "jax":
            impls[name] = JaxEngine(bundle)
        elif name == "jax-mesh":
            config, tokenizer = bundle.config, bundle.tokenizer
            impls[name] = JaxEngine(make_bundle(config, tokenizer, params, dtype, mesh=mesh))
        elif name == "jax-nocache":
            impls[name] = JaxRecompute(bundle)
        elif name in ("torch-nanogpt", "torch-compile"):
            model = torch_model(bundle.config, params, device, dtype)
            impls[name] = TorchNanoGPT(model, device, vocab_size, name == "torch-compile")
        elif name == "hf":
            import torch

            from nanogpt_jax.interop.hf_model import to_hf

            model = to_hf(bundle.config, params, vocab_size)
            impls[name] = HuggingFace(model.to(device=device, dtype=getattr(torch, dtype)), device)
        else:
            raise ValueError(f"unknown implementation {name!r}")
    return impls
