"""The text generators the benchmark races, behind one interface, all on the same weights.

    jax            this project's engine: prefill, then a jitted KV-cached decode scan
    jax-mesh       the same engine on a device mesh (`--mesh`), batch rows over `data`
    jax-nocache    this project's model, nanoGPT's algorithm (see `nanogpt_jax.bench.nocache`)
    torch-nanogpt  nanoGPT's model and `generate` in PyTorch, eager (no cache)
    torch-compile  the same under `torch.compile`
    torch-fast     gpt-fast's recipe on nanoGPT's model: static KV cache, compiled one-token
                   step, CUDA graphs on a GPU (see `nanogpt_jax.bench.torch_fast`)
    hf             Hugging Face `GPT2LMHeadModel.generate`, its dynamic KV cache, eager
    hf-static      the same with its static cache, compiled (CUDA graphs) on a GPU; on a CPU,
                   where transformers does not compile by itself, the faster of eager and
                   forced compilation, measured on the first shape (`variant` says which)

Every one decodes greedily, or draws as nanoGPT's sample.py does (`sampling` = temperature,
top_k), and returns exactly `num_new` tokens per row as a numpy array, so reading the result
also waits for the device.
"""

from __future__ import annotations

import importlib.util
import time

import jax.numpy as jnp
import numpy as np

from nanogpt_jax.bundle import ModelBundle
from nanogpt_jax.config import GPTConfig

ALL_IMPLS = (
    "jax",
    "jax-nocache",
    "torch-nanogpt",
    "torch-compile",
    "torch-fast",
    "hf",
    "hf-static",
)
DEFAULT_IMPLS = ("jax", "jax-nocache", "torch-nanogpt", "torch-fast", "hf", "hf-static")
NEEDS = {
    "torch-nanogpt": ("torch",),
    "torch-compile": ("torch",),
    "torch-fast": ("torch",),
    "hf": ("torch", "transformers"),
    "hf-static": ("torch", "transformers"),
}
PYTORCH_IMPLS = ("torch-nanogpt", "torch-compile", "torch-fast", "hf", "hf-static")
# Ways torch-fast may run its step on a CPU: Inductor's options, or None for eager PyTorch.
# scripts/torch_fast_settings.py times each; docs/benchmarks.md records what they gave.
TORCH_CPU_VARIANTS = {
    "eager": None,
    "compiled": {},
    "freezing": {"freezing": True},
    "max-autotune": {"max_autotune": True},
    "cpp-wrapper": {"cpp_wrapper": True},
    "freezing+cpp-wrapper": {"freezing": True, "cpp_wrapper": True},
}
# the ones the benchmark tries by default, keeping the fastest per shape
TORCH_CPU_CANDIDATES = ("eager", "freezing", "cpp-wrapper")
GREEDY = (0.0, None)  # (temperature, top_k)


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
    sampling: tuple = GREEDY  # (temperature, top_k): 0 is greedy
    variant: str | None = None  # which of its ways of running it measured fastest

    def generate(self, prompts: np.ndarray, num_new: int) -> np.ndarray:
        """Continuations (B, num_new) of prompts (B, P), drawn as `sampling` says."""
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
        temperature, top_k = self.sampling
        result = self.bundle.generate(
            prompts,
            max_new_tokens=num_new,
            temperature=temperature,
            top_k=top_k,
            batch_size=len(prompts),
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
        from nanogpt_jax.bench.nocache import generate_nocache
        from nanogpt_jax.sampling import SamplingParams

        vocab_size = self.bundle.tokenizer.vocab_size
        temperature, top_k = self.sampling
        sampling = SamplingParams.create(temperature, top_k, vocab_size=vocab_size)
        prompts = jnp.asarray(prompts, jnp.int32)
        key = (prompts.shape, num_new, self.sampling)
        args = (self.bundle.params, prompts, sampling, 0)
        if key not in self.programs:
            began = time.perf_counter()
            lowered = generate_nocache.lower(
                self.bundle.graphdef, *args, num_new=num_new, vocab_size=vocab_size
            )
            self.programs[key] = lowered.compile()
            self.compile_seconds += time.perf_counter() - began
            self.remember(key[:2], [self.programs[key]])
        return np.asarray(self.programs[key](*args))


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
    name, recomputes = "torch-nanogpt", True

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
        temperature, top_k = self.sampling
        with torch.inference_mode():
            # called on the (possibly compiled) module, so its forward is the compiled one
            out = GPT.generate(
                self.module, idx, num_new, temperature, top_k, vocab_size=self.vocab_size
            )
        return out[:, prompts.shape[1] :].cpu().numpy()


class FastestVariant:
    """An implementation with several ways to run on a CPU (`candidates`): for each new prompt
    shape, each way is timed warm on a few decode steps and the fastest is kept (`variant`
    names it; on CUDA there is one way, and no choice)."""

    candidates: tuple[str, ...]
    chosen: dict
    block_size: int
    TRIAL_TOKENS = 32

    def generate(self, prompts, num_new):
        if self.candidates:
            self.variant = self.fastest(prompts)
        return self.run(prompts, num_new)

    def fastest(self, prompts) -> str:
        chosen = self.chosen  # prompt shape -> variant
        if prompts.shape not in chosen:
            trial = min(self.TRIAL_TOKENS, self.block_size - prompts.shape[1])
            timings = {}
            for variant in self.candidates:
                self.variant = variant
                self.run(prompts, trial)  # warm-up: compiles
                began = time.perf_counter()
                self.run(prompts, trial)
                timings[variant] = time.perf_counter() - began
            chosen[prompts.shape] = min(timings, key=timings.get)
        return chosen[prompts.shape]


class TorchFast(FastestVariant, TorchMemory, Implementation):
    name, compiles = "torch-fast", True

    def __init__(self, model, device: str, vocab_size: int, cpu_variants: tuple[str, ...]):
        self.model, self.device, self.vocab_size = model, device, vocab_size
        self.block_size = model.config.block_size
        self.decoders = {}
        self.compile_seconds = 0.0
        # CUDA graphs on a GPU; on a CPU compiled or eager, whichever runs faster here
        self.variant = "cuda-graphs" if device == "cuda" else None
        self.candidates, self.chosen = () if device == "cuda" else cpu_variants, {}

    def run(self, prompts, num_new):
        from nanogpt_jax.bench.torch_fast import StaticCacheDecoder

        if self.variant not in self.decoders:
            options = {} if self.device == "cuda" else TORCH_CPU_VARIANTS[self.variant]
            self.decoders[self.variant] = StaticCacheDecoder(
                self.model, self.device, self.vocab_size, options
            )
        decoder = self.decoders[self.variant]
        before = decoder.compile_seconds
        tokens = decoder.generate(prompts, num_new, *self.sampling)
        self.compile_seconds += decoder.compile_seconds - before
        return tokens


class HuggingFace(TorchMemory, Implementation):
    name = "hf"

    def __init__(self, model, device: str):
        self.model = model
        self.device = device

    def options(self) -> dict:
        """generate()'s arguments beyond the prompt: what selects the cache and compilation."""
        return {}

    def generate(self, prompts, num_new):
        import torch

        temperature, top_k = self.sampling
        drawn = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=1.0)
        idx = torch.from_numpy(np.asarray(prompts, np.int64)).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=idx,
                attention_mask=torch.ones_like(idx),
                max_new_tokens=num_new,
                use_cache=True,
                **(dict(do_sample=False) if temperature == 0 else drawn),
                **self.options(),
            )
        new = out[:, prompts.shape[1] :].cpu().numpy()
        if new.shape[1] != num_new:
            raise RuntimeError(
                f"{self.name} generate returned {new.shape[1]} tokens, not {num_new}"
            )
        return new


class HuggingFaceStatic(FastestVariant, HuggingFace):
    """Hugging Face's fast path: a static cache and a compiled forward (CUDA graphs on CUDA).
    On a CPU transformers compiles only when told to (`_compile_all_devices`), so eager and
    compiled both run on each prompt shape and the faster is kept."""

    name, compiles = "hf-static", True

    def __init__(self, model, device: str):
        super().__init__(model, device)
        self.block_size = model.config.n_positions
        self.variant = "cuda-graphs" if device == "cuda" else None
        self.candidates, self.chosen = () if device == "cuda" else ("eager", "compiled"), {}

    def options(self) -> dict:
        from transformers import CompileConfig

        options = dict(cache_implementation="static")
        if self.variant == "eager":
            return options | dict(disable_compile=True)
        config = CompileConfig(
            fullgraph=True, mode="reduce-overhead" if self.device == "cuda" else "default"
        )
        config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
        return options | dict(compile_config=config)

    def run(self, prompts, num_new):
        return HuggingFace.generate(self, prompts, num_new)


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
    torch_cpu_variants: tuple[str, ...] = ("eager",),
) -> dict[str, Implementation]:
    """The named implementations; `bundle` computes in `dtype`, `params` are float32 on host.

    device: "cpu" or "cuda" (torch's name). mesh: where `jax-mesh` runs. torch_cpu_variants:
    the ways torch-fast may run on a CPU (TORCH_CPU_VARIANTS).
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
        elif name == "torch-fast":
            model = torch_model(bundle.config, params, device, dtype)
            impls[name] = TorchFast(model, device, vocab_size, torch_cpu_variants)
        elif name in ("hf", "hf-static"):
            import torch

            from nanogpt_jax.interop.hf_model import to_hf

            model = to_hf(bundle.config, params, vocab_size)
            model = model.to(device=device, dtype=getattr(torch, dtype))
            impls[name] = (HuggingFace if name == "hf" else HuggingFaceStatic)(model, device)
        else:
            raise ValueError(f"unknown implementation {name!r}")
    return impls
