"""PyTorch at its best for decoding: gpt-fast's recipe (pytorch-labs/gpt-fast, generate.py) on
nanoGPT's torch model, the baseline a PyTorch engineer would race.

    prefill       the prompt through the model, writing per-layer KV buffers preallocated to
                  prompt + new tokens; compiled apart from the step (no CUDA graphs)
    decode step   one token for every row: its keys and values written at `input_pos`, a
                  device tensor (a Python int would recompile or break the graph), attention
                  under an explicit mask (SDPA's is_causal aligns to the upper left, wrong for
                  one query against many keys), the draw inside the graph with no host sync;
                  torch.compile(fullgraph=True), mode="reduce-overhead" (CUDA graphs) on CUDA;
                  outputs cloned, since a graph replay overwrites them
    past block_size  nanoGPT's crop: the last block_size tokens, positions from 0, through
                  the whole model each step (compiled once, at that fixed width)

Draws as gpt-fast draws: greedy argmax, or temperature then top-k, then the exponential race
`argmax(probs / Exponential(1))`, a categorical sample without torch.multinomial's sync.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F


class KVBuffers(torch.nn.Module):
    """One layer's static cache, as module buffers (gpt-fast's KVCache)."""

    def __init__(self, shape: tuple, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at slots input_pos (T,); the whole buffers back."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class StaticCacheDecoder:
    """Decodes with one nanoGPT GPT (interop.torch_reference.GPT) and static KV buffers."""

    def __init__(self, model, device: str, vocab_size: int, compile_options: dict | None):
        """compile_options: Inductor's options for a CPU ({}: its defaults), or None to run
        eager; on CUDA the step is always compiled, with CUDA graphs."""
        self.model = model
        self.device = device
        self.vocab_size = vocab_size
        self.config = model.config
        self.compile_seconds = 0.0
        self.compile_options = {} if device == "cuda" else compile_options
        self.programs: dict = {}
        self.caches: torch.nn.ModuleList | None = None
        # every shape of a benchmark grid compiles its own graphs of the same three functions
        # (dynamic=False, as gpt-fast): more than dynamo's default of 8 per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)

    # ------------------------------------------------------------------ the model, cached

    def setup_caches(self, batch: int, length: int) -> None:
        """Per-layer (B, H, S, D) key and value buffers for S = prompt + new tokens, reused
        (zeroed) while the shape stays: their addresses stay, as CUDA graphs need."""
        config, dtype = self.config, self.model.lm_head.weight.dtype
        shape = (batch, config.n_head, length, config.n_embd // config.n_head)
        if self.caches is None or self.caches[0].k.shape != shape:
            self.caches = torch.nn.ModuleList(
                KVBuffers(shape, dtype, self.device) for _ in range(config.n_layer)
            )
        else:
            for cache in self.caches:
                cache.k.zero_()
                cache.v.zero_()

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) at the last of the tokens idx (B, T) placed at input_pos (T,), their
        keys and values written into the caches."""
        model, (B, T) = self.model, idx.shape
        C, H = self.config.n_embd, self.config.n_head
        x = model.transformer.wte(idx) + model.transformer.wpe(input_pos)  # (B, T, C)
        S = self.caches[0].k.shape[2]
        mask = torch.arange(S, device=idx.device)[None, :] <= input_pos[:, None]  # (T, S)
        for block, cache in zip(model.transformer.h, self.caches, strict=True):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            k, v = cache.update(input_pos, k, v)  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + block.attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        return model.lm_head(model.transformer.ln_f(x[:, -1]))  # (B, V)

    # ------------------------------------------------------------------ compiled pieces

    def program(self, name: str, temperature: float, top_k: int | None):
        """The compiled prefill, decode step or window of one sampling setting (constants of
        its graph), and the input shapes it has run."""
        key = (name, temperature, top_k)
        if key not in self.programs:
            vocab = self.vocab_size

            def prefill(idx, input_pos):  # (B, P), (P,)
                return draw(self.forward(idx, input_pos)[:, :vocab], temperature, top_k)

            def decode(token, input_pos):  # (B, 1), (1,)
                return draw(self.forward(token, input_pos)[:, :vocab], temperature, top_k)

            def window(idx):  # (B, block_size): nanoGPT's crop, no cache
                logits = self.model(idx, last_only=True)[:, -1, :vocab]
                return draw(logits, temperature, top_k)

            function = {"prefill": prefill, "decode": decode, "window": window}[name]
            options = {"fullgraph": True, "dynamic": False}
            if self.device == "cuda" and name == "decode":
                options["mode"] = "reduce-overhead"  # CUDA graphs
            elif self.device != "cuda" and self.compile_options:
                options["options"] = dict(self.compile_options)
            if self.eager:
                self.programs[key] = (function, None)
            else:
                self.programs[key] = (torch.compile(function, **options), set())
        return self.programs[key]

    @property
    def eager(self) -> bool:
        return self.compile_options is None

    def run(self, name: str, sampling: tuple, *args):
        compiled, shapes = self.program(name, *sampling)
        shape = tuple(tuple(a.shape) for a in args)
        if shapes is None or shape in shapes:  # eager, or compiled for this shape already
            return compiled(*args)
        began = time.perf_counter()
        out = compiled(*args)
        self.synchronize()
        self.compile_seconds += time.perf_counter() - began
        shapes.add(shape)
        return out

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: np.ndarray, num_new: int, temperature=0.0, top_k=None):
        """num_new tokens (B, num_new) after prompts (B, P), as numpy."""
        block_size = self.config.block_size
        idx = torch.from_numpy(np.asarray(prompts, np.int64)).to(self.device)
        B, P = idx.shape
        idx = idx[:, -block_size:]  # nanoGPT's crop of a long prompt
        P = idx.shape[1]
        cached_steps = min(num_new - 1, block_size - P)  # steps whose context fits the cache
        sampling = (float(temperature), top_k)
        tokens = []
        with torch.inference_mode():
            self.setup_caches(B, P + max(cached_steps, 0))
            token = self.run("prefill", sampling, idx, torch.arange(P, device=self.device))
            tokens.append(token.clone())
            input_pos = torch.tensor([P], device=self.device)
            for _ in range(cached_steps):
                token = self.run("decode", sampling, token.view(B, 1), input_pos)
                tokens.append(token.clone())  # the next replay overwrites the graph's output
                input_pos += 1
            context = torch.cat([idx, torch.stack(tokens, dim=1)], dim=1)
            for _ in range(num_new - 1 - cached_steps):
                token = self.run("window", sampling, context[:, -block_size:].contiguous())
                context = torch.cat([context, token.view(B, 1)], dim=1)
                tokens.append(token)
        return torch.stack(tokens[:num_new], dim=1).cpu().numpy()


def draw(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """One id per row of float logits (B, V), inside the compiled graph: gpt-fast's sampler."""
    logits = logits.float()
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = logits / temperature
    if top_k is not None:
        pivot = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = torch.where(logits < pivot, -float("inf"), logits)
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / race, dim=-1)
