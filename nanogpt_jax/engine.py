"""The decode engine: prefill prompts into a KV cache, then draw tokens in one jitted scan.

Everything here is a pure function of (graphdef, params, inputs), compiled ahead of time per
shape by `Engine`; `nanogpt_jax.generate` drives it from the host.

Context past block_size: the model sees only the last block_size tokens with positions
0..block_size-1, exactly as nanoGPT's `generate` crops. Positions then shift with every new
token, so no cached key or value stays valid: each such step recomputes the whole window
(a block_size-token forward pass per token, nanoGPT's cost) instead of a one-token cached step.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogpt_jax.home import cache_home
from nanogpt_jax.model import KVCache, init_cache
from nanogpt_jax.sampling import SamplingParams, sample
from nanogpt_jax.sharding import batch_sharding, cache_sharding, global_array

if TYPE_CHECKING:  # the bundle holds an Engine; the engine only reads the bundle's fields
    from nanogpt_jax.bundle import ModelBundle

FILL = -1  # token buffer slots not written yet, or written after a row stopped
STEPS_BETWEEN_CHECKS = 16  # decode steps between two looks at whether every row is done


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The scan carry: what changes from one new token to the next."""

    logits: jax.Array  # (B, V) float32: next-token logits of each row
    cache: KVCache  # keys/values of the P prompt slots and the new tokens
    tokens: jax.Array  # (B, P + N) int32: left-padded prompts, then new tokens (FILL: none yet)
    done: jax.Array  # (B,) bool: row stopped (stop token, or max_new_tokens reached)
    bad_logits: jax.Array  # (B,) bool: a row saw NaN or infinite logits
    step: jax.Array  # () int32: new tokens drawn so far


def prompt_positions(start, length):
    """(B, T) positions of slots 0..length-1 for rows whose real tokens begin at `start`."""
    return jnp.maximum(jnp.arange(length)[None, :] - start[:, None], 0)


def prefill(graphdef, params, tokens, start, *, num_new_slots: int, cache_sharding) -> DecodeState:
    """Run the left-padded prompts (B, P) through the model, filling a fresh cache.

    cache_sharding: None on one device; on a mesh, where the (B, H, S, D) cache lives.
    """
    model = nnx.merge(graphdef, params)
    B, P = tokens.shape
    # slots for the prompt, plus one per new token while the context still fits block_size
    num_slots = P + min(num_new_slots, model.config.block_size)
    cache = init_cache(
        model.config, B, num_slots, start, model.dtype, fold_heads=cache_sharding is None
    )
    if cache_sharding is not None:
        cache = dataclasses.replace(
            cache,
            k=[jax.lax.with_sharding_constraint(k, cache_sharding) for k in cache.k],
            v=[jax.lax.with_sharding_constraint(v, cache_sharding) for v in cache.v],
        )
    logits, cache = model(tokens, prompt_positions(start, P), cache, last_only=True)
    buffer = jnp.full((B, P + num_new_slots), FILL, jnp.int32).at[:, :P].set(tokens)
    return DecodeState(
        logits=logits[:, -1],
        cache=cache,
        tokens=buffer,
        done=jnp.zeros((B,), bool),
        bad_logits=jnp.zeros((B,), bool),
        step=jnp.zeros((), jnp.int32),
    )


def decode(
    graphdef,
    params,
    state: DecodeState,
    seed,
    row_ids,
    sampling: SamplingParams,
    num_new,
    stop_ids,
    *,
    prompt_slots: int,
    num_steps: int,
    vocab_size: int,
) -> DecodeState:
    """Draw `num_steps` more tokens for every row (rows that are done only repeat FILL), or
    fewer once every row is done. num_steps: a power of two, so groups of steps divide it.

    seed: () root of the randomness. row_ids: (B,) each row's index in the request, which
    selects its key stream. num_new: () tokens wanted per row.
    stop_ids: (K,) ids that end a row. vocab_size: the tokenizer's; ids of a padded embedding
    beyond it are never drawn.
    """
    model = nnx.merge(graphdef, params)
    block_size = model.config.block_size
    # row i's stream: fold_in(root, i); its key at step t: fold_in(stream, t)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids)
    prompt_lengths = prompt_slots - state.cache.start  # (B,) real prompt tokens per row

    def cached_forward(token, state: DecodeState) -> DecodeState:
        slot = prompt_slots + state.step - 1  # == state.cache.index
        positions = (slot - state.cache.start)[:, None]  # (B, 1)
        logits, cache = model(token[:, None], positions, state.cache)
        return dataclasses.replace(state, logits=logits[:, -1], cache=cache)

    def window_forward(token, state: DecodeState) -> DecodeState:
        # the last block_size tokens of each row, positions starting at 0 (nanoGPT's crop)
        end = prompt_slots + state.step
        window = jax.lax.dynamic_slice_in_dim(state.tokens, end - block_size, block_size, 1)
        start = jnp.maximum(state.cache.start - (end - block_size), 0)  # (B,)
        window = jnp.maximum(window, 0)  # stopped rows hold FILL; their logits are unused
        logits, _ = model(window, prompt_positions(start, block_size), start=start, last_only=True)
        return dataclasses.replace(state, logits=logits[:, -1])

    def draw(state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Each row's next token, drawn from its logits and written into the buffer."""
        # this row's stream, this step: fold_in(fold_in(root, row), step)
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, state.step)
        drawn = sample(state.logits[:, :vocab_size], keys, sampling)
        token = jnp.where(state.done, FILL, drawn)  # (B,)
        bad = ~state.done & ~jnp.all(jnp.isfinite(state.logits), axis=-1)
        done = state.done | jnp.isin(token, stop_ids) | (state.step + 1 >= num_new)
        state = DecodeState(
            logits=state.logits,
            cache=state.cache,
            tokens=jax.lax.dynamic_update_slice(
                state.tokens, token[:, None], (0, prompt_slots + state.step)
            ),
            done=done,
            bad_logits=state.bad_logits | bad,
            step=state.step + 1,
        )
        return token, state

    def advance(token, state: DecodeState) -> DecodeState:
        """The model on the newest tokens: the logits the next draw needs."""
        if state.tokens.shape[1] <= block_size:  # no row can outgrow the window
            return cached_forward(token, state)
        windowed = jnp.max(prompt_lengths + state.step) > block_size
        state = run_if(~windowed, functools.partial(cached_forward, token), state)
        return run_if(windowed, functools.partial(window_forward, token), state)

    def step(state: DecodeState, _):
        token, state = draw(state)
        return advance(token, state), None

    # Groups of steps with a fixed trip count, checking between groups whether any row still
    # runs: a GPU decides a data-dependent branch on the host, a pipeline stall, so checking
    # every step would cost a stall per token. Rows that stopped waste at most a group. The
    # model step that closes a group runs only if a row goes on: a request's last token
    # needs no logits after it (a one-token request is a prefill and a draw).
    group = min(num_steps, STEPS_BETWEEN_CHECKS)
    assert num_steps % group == 0, f"num_steps={num_steps} is not a multiple of {group}"
    last_step = state.step + num_steps

    def more(state: DecodeState):
        return (state.step < last_step) & ~jnp.all(state.done)

    def run_group(state: DecodeState) -> DecodeState:
        state = jax.lax.scan(step, state, length=group - 1)[0]
        token, state = draw(state)
        return run_if(~jnp.all(state.done), functools.partial(advance, token), state)

    return jax.lax.while_loop(more, run_group, state)


def run_if(predicate, function, operand):
    """`function(operand)` if `predicate` else `operand`, updating buffers in place.

    `lax.cond` means the same, but XLA then copies every buffer its branches share with the
    enclosing loop: the whole KV cache, at every step. A while loop that runs at most once
    updates them where they lie.
    """
    _, out = jax.lax.while_loop(
        lambda carry: carry[0], lambda carry: (False, function(carry[1])), (predicate, operand)
    )
    return out


@dataclasses.dataclass
class Engine:
    """Compiled prefill/decode programs of one model, keyed by shapes and static options."""

    bundle: ModelBundle
    programs: dict = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0

    @property
    def compile_count(self) -> int:
        return len(self.programs)

    def compiled(self, name: str, function: Callable, static: dict, donate: tuple, params, *args):
        """The program for `function(graphdef, params, *args, **static)` at these shapes.

        The key leaves out `params`: they are this bundle's, fixed for the engine's life, and
        describing their tree is costly (milliseconds per call for a large model).
        """
        leaves, structure = jax.tree.flatten(args)
        signature = tuple(
            (jnp.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves
        )
        key = (name, tuple(sorted(static.items())), structure, signature)
        args = (params, *args)
        if key not in self.programs:
            began = time.perf_counter()
            jitted = jax.jit(
                function, static_argnums=0, static_argnames=tuple(static), donate_argnames=donate
            )
            lowered = jitted.lower(self.bundle.graphdef, *args, **static)
            self.programs[key] = lowered.compile()
            self.compile_seconds += time.perf_counter() - began
        return self.programs[key]

    @property
    def mesh(self):
        return self.bundle.mesh

    def rows(self, value) -> jax.Array:
        """A host array of batch rows, placed like the batch (split over `data` on a mesh)."""
        if self.mesh is None:
            return jnp.asarray(value)
        return global_array(value, batch_sharding(self.mesh, np.ndim(value)))

    def prefill(self, tokens, start, num_new_slots):
        args = (self.bundle.params, self.rows(tokens), self.rows(start))
        mesh = self.mesh
        static = dict(
            num_new_slots=num_new_slots,
            cache_sharding=None if mesh is None else cache_sharding(self.bundle.config, mesh),
        )
        program = self.compiled("prefill", prefill, static, (), *args)
        return program(*args)

    def decode(self, state, seed, row_ids, sampling, num_new, stop_ids, prompt_slots, num_steps):
        args = (
            self.bundle.params,
            state,
            jnp.int32(seed),
            self.rows(row_ids),
            sampling,
            jnp.int32(num_new),
            stop_ids,
        )
        vocab_size = self.bundle.tokenizer.vocab_size
        static = dict(prompt_slots=prompt_slots, num_steps=num_steps, vocab_size=vocab_size)
        program = self.compiled("decode", decode, static, ("state",), *args)
        return program(*args)


def engine_of(bundle: ModelBundle) -> Engine:
    if bundle.engine is None:
        enable_persistent_compilation_cache()
        # random bits depend only on the key and the shape, not on how arrays are sharded
        jax.config.update("jax_threefry_partitionable", True)
        bundle.engine = Engine(bundle)
    return bundle.engine


def enable_persistent_compilation_cache(directory=None) -> None:
    """Keep compiled programs on disk so the next process skips compilation. Respects a cache
    directory the user configured for JAX; otherwise uses `$NANOGPT_JAX_HOME/xla`."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory or cache_home() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
