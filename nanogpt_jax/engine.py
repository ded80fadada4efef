"""The decode engine: prompts into a KV cache, then tokens drawn in one jitted loop.

Everything here is a pure function of (graphdef, params, inputs), compiled ahead of time per
shape by `Engine`; `nanogpt_jax.generate` (one batch of requests) and `nanogpt_jax.serve`
(requests that come and go) drive it from the host.

A decode state is a fixed set of rows. Each row carries its own length, key stream, step
count and sampling settings, so rows that began at different times decode together:

    prefill  prompts (n, P) right-padded -> their keys/values, next-token logits
    start    n prefilled rows -> a new state (one batch, all rows begin together)
    insert   one prefilled row -> slot s of a running state (a server's new request),
             its first token drawn at once; the next decode emits that token first
    decode   every row draws K tokens: [draw -> write -> one-token model step] x K;
             or the first rows only, when the others are empty (a server's few requests)

    slot:     0    1    2    3    4    5    6    7    8
    row 0:    a    b    c    d  | <- its next token goes here (lengths[0] = 4)
    row 1:    e    f  | <- inserted later, at its own position 2
    row 2:    g    h    i    j    k    l    m  |     (lengths[2] = 7)

Context past block_size: the model sees only the last block_size tokens with positions
0..block_size-1, exactly as nanoGPT's `generate` crops. Positions then shift with every new
token, so no cached key or value of that row stays valid: such a row's logits come from the
whole window (a block_size-token forward pass per token, nanoGPT's cost).

Batch invariance: a row's logits depend only on its own tokens, never on the other rows or the
cache size, so a seeded sample is the same text alone or among others. XLA:CPU sums a product of
one row in another order than a product of several, and hands large reductions to a library that
sums in yet another order; so reductions stay in XLA's own loops (CPU_COMPILER_OPTIONS), and the
server decodes with at least MIN_ROWS rows. A prefill's products have a row per prompt token
(its lm_head takes each prompt's last position twice), so a prompt prefilled alone gets the
keys, values and logits it gets beside others. A decode step of 1 to 16 rows multiplies in the
native kernel (`kernels/rows_times.py`), which sums each row on its own; a lone float32 row
keeps XLA's one-row product on CPUs without AVX-512 (faster there), and past 16 rows XLA's
library products are faster: there a row's logits match a batch's of 2-16 rows to about 1e-6 of
their scale, not bit for bit. (So does a lone row's where no kernel is built: hence MIN_ROWS.) A
decode step's attention (the native kernel on a CPU, `kernels/decode_attention.py`, or XLA's
blocks) sums over a row's own slots only.
tests/test_batch_invariance.py checks each. On a GPU it holds only as far as its kernels are
batch-invariant.
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
from nanogpt_jax.kernels import decode_attention
from nanogpt_jax.model import KVCache, init_cache
from nanogpt_jax.sampling import SamplingParams, sample, top_k
from nanogpt_jax.sharding import batch_sharding, cache_sharding, global_array

if TYPE_CHECKING:  # the bundle holds an Engine; the engine only reads the bundle's fields
    from nanogpt_jax.bundle import ModelBundle

FILL = -1  # no token: not drawn yet, or drawn after a row stopped
STEPS_BETWEEN_CHECKS = 16  # decode steps between two looks at whether every row is done
MIN_ROWS = 2  # rows of every server program: see "Batch invariance" above
# On a CPU a decode step reads the cache in blocks of this many slots, only as far as its
# longest row: a server's slots hold block_size slots each, mostly empty (gpt2, 16 rows, 1024
# slots: 107 ms/step against 144 reading every slot; a batch's cache, sized to its request,
# is within 2-4% either way in float32). Once the rows reach past half the cache, one product
# over every block (no block copied out) is cheaper and gives the same bits (`attend_filled`).
# Where the native attention kernel is built, each row reads its own filled slots instead and
# the blocks only round the cache's size (gpt2, batch 8: docs/benchmarks.md). On a GPU a loop
# of unknown length would stop the device for the host at each layer, so every slot is read.
ATTEND_BLOCK = 128
# XLA:CPU hands large reductions and elementwise fusions to YNNPACK, which sums in another
# order than XLA's own loops, so a row's layer norms and softmaxes would depend on how many
# rows share its batch: only lone matrix products go to the library (see "Batch invariance")
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefilled:
    """Prompts run through the model: what their rows need to start decoding."""

    logits: jax.Array  # (n, V) float32: next-token logits after each prompt
    k: list[jax.Array]  # n_layer x (n*H, P, D) or (n, H, P, D): the prompts' keys
    v: list[jax.Array]  # n_layer x (n*H, P, D) or (n, H, P, D)
    lengths: jax.Array  # (n,) int32: real prompt tokens of each row
    tokens: jax.Array  # (n, P) int32: the right-padded prompts
    # with prompt_logprobs=L: log-probability of each prompt token after the ones before it
    # (n, P) (position 0 has none), and the L likeliest ids there with theirs, (n, P, L)
    token_logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The loop's carry: what changes from one new token to the next, for every row."""

    logits: jax.Array  # (B, V) float32: next-token logits of each row
    cache: KVCache  # keys/values; cache.lengths (B,) tokens of each row so far
    history: jax.Array  # (B, W) int32: each row's last W tokens (W = block_size when a row
    #                     can outgrow it, for the window recompute; else W = 0)
    keys: jax.Array  # (B,) PRNG keys: row r of a request draws from fold_in(key(seed), r)
    step: jax.Array  # (B,) int32: tokens drawn by the row so far
    max_new: jax.Array  # (B,) int32: tokens the row may draw
    sampling: SamplingParams  # (B,) settings per row
    done: jax.Array  # (B,) bool: row stopped (stop token, max_new reached) or is empty
    bad_logits: jax.Array  # (B,) bool: a row saw NaN or infinite logits
    # (B,) int32: the row's next token when it was already drawn (by `insert`, so that a
    # server can send it before the next decode call), FILL when the next draw is to come
    drawn: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Emitted:
    """What one decode call drew, K steps of it (FILL: no token)."""

    tokens: jax.Array  # (B, K) int32
    logprobs: jax.Array  # (B, K) float32: the model's log-probability of each token
    top_ids: jax.Array  # (B, K, L) int32: the L likeliest ids at each step (L may be 0)
    top_logprobs: jax.Array  # (B, K, L) float32


def log_probabilities(logits, vocab_size: int):
    """The model's own log-probabilities over the real vocabulary (before any filter)."""
    return jax.nn.log_softmax(logits[..., :vocab_size].astype(jnp.float32), axis=-1)


def prefill(
    graphdef,
    params,
    tokens,
    lengths,
    *,
    cache_sharding,
    cache_dtype,
    prompt_logprobs: int,
    vocab_size: int,
) -> Prefilled:
    """Run right-padded prompts (n, P) through the model into a cache of exactly P slots, so
    that a row's numbers depend on its own prompt and bucket only.

    cache_sharding: None on one device; on a mesh, where the (n, H, P, D) cache lives.
    cache_dtype: the cache's (see `Engine.cache_dtype`).
    prompt_logprobs: L > 0 also scores every prompt token (for a server's echo).
    """
    model = nnx.merge(graphdef, params)
    n, P = tokens.shape
    cache = init_cache(model.config, n, P, cache_dtype, fold_heads=cache_sharding is None)
    if cache_sharding is not None:
        cache = dataclasses.replace(
            cache,
            k=[jax.lax.with_sharding_constraint(k, cache_sharding) for k in cache.k],
            v=[jax.lax.with_sharding_constraint(v, cache_sharding) for v in cache.v],
        )
    # padding after a prompt sits at the prompt's last position: no position a prompt does
    # not reach is ever computed (masked slots are multiplied by zero, and 0 * NaN is NaN)
    positions = jnp.minimum(jnp.arange(P)[None, :], (lengths - 1)[:, None])
    if prompt_logprobs:
        logits, cache = model(tokens, positions, cache)  # (n, P, V)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        scores = log_probabilities(logits[:, :-1], vocab_size)  # (n, P-1, V): of tokens 1..P-1
        chosen = jnp.take_along_axis(scores, tokens[:, 1:, None], axis=-1)[..., 0]
        top_logprobs, top_ids = jax.lax.top_k(scores, prompt_logprobs)
        pad = lambda x: jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        token_logprobs, top_ids, top_logprobs = pad(chosen), pad(top_ids), pad(top_logprobs)
    else:
        # each prompt's last position twice: the lm_head then multiplies two rows or more,
        # which XLA:CPU sums as it sums any batch's (one row alone it sums in another order),
        # so a prompt prefilled alone gets the logits it gets beside others
        logits, cache = model(tokens, positions, cache, last=jnp.stack([lengths - 1] * 2, 1))
        last = logits[:, 0]
        token_logprobs = jnp.zeros((n, 0), jnp.float32)
        top_ids, top_logprobs = jnp.zeros((n, 0, 0), jnp.int32), jnp.zeros((n, 0, 0))
    return Prefilled(
        logits=last,
        k=cache.k,
        v=cache.v,
        lengths=lengths,
        tokens=tokens,
        token_logprobs=token_logprobs,
        top_ids=top_ids,
        top_logprobs=top_logprobs,
    )


def start(
    prefilled: Prefilled, keys, sampling: SamplingParams, max_new, *, num_slots: int, window: int
) -> DecodeState:
    """A new decode state whose rows are the prefilled prompts, all beginning now.

    keys: (n,) each row's key stream. num_slots: cache slots per row. window: W of `history`.
    """
    n, P = prefilled.tokens.shape
    pad_slots = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, num_slots - P), (0, 0)])  # noqa: E731
    history = prefilled.tokens[:, :window]
    history = jnp.pad(history, [(0, 0), (0, window - history.shape[1])])
    return DecodeState(
        logits=prefilled.logits,
        cache=KVCache(
            k=[pad_slots(k) for k in prefilled.k],
            v=[pad_slots(v) for v in prefilled.v],
            lengths=prefilled.lengths,
        ),
        history=history,
        keys=keys,
        step=jnp.zeros((n,), jnp.int32),
        max_new=max_new,
        sampling=sampling,
        done=jnp.zeros((n,), bool),
        bad_logits=jnp.zeros((n,), bool),
        drawn=jnp.full((n,), FILL, jnp.int32),
    )


def empty_state(
    config, batch_size: int, num_slots: int, window: int, vocab_size: int, dtype, fold_heads=True
) -> DecodeState:
    """A state of `batch_size` empty rows (done, drawing nothing) for rows to be inserted."""
    B = batch_size
    return DecodeState(
        logits=jnp.zeros((B, config.vocab_size), jnp.float32),
        cache=init_cache(config, B, num_slots, dtype, fold_heads),
        history=jnp.zeros((B, window), jnp.int32),
        keys=jax.vmap(jax.random.key)(jnp.zeros((B,), jnp.uint32)),
        step=jnp.zeros((B,), jnp.int32),
        max_new=jnp.zeros((B,), jnp.int32),
        sampling=SamplingParams.create(vocab_size=vocab_size).for_rows(B),
        done=jnp.ones((B,), bool),
        bad_logits=jnp.zeros((B,), bool),
        drawn=jnp.full((B,), FILL, jnp.int32),
    )


def insert(
    state: DecodeState,
    prefilled: Prefilled,
    row,
    slot,
    seed,
    row_id,
    sampling: SamplingParams,
    max_new,
    *,
    vocab_size: int,
) -> tuple[DecodeState, jax.Array]:
    """Row `row` of `prefilled` into slot `slot` of a running state, the other rows untouched,
    and the row's first token: drawn now, so that it need not wait for the next decode call
    (which emits it, as it would have drawn it: same logits, same key, same settings).

    seed, row_id: its key stream (see `row_keys`). sampling: its settings (scalars). The slot's
    cache is overwritten from slot 0 up to the prompt bucket; what lies beyond is past the
    row's length, unseen.
    """
    key = row_keys(seed, row_id[None])[0]
    H = state.cache.k[0].shape[0] // state.done.shape[0] if state.cache.k[0].ndim == 3 else 1

    def put(buffer, rows):  # rows of this prefilled row -> the slot's rows of buffer
        if buffer.ndim == 3:  # (B*H, S, D): a row is H consecutive rows
            part = jax.lax.dynamic_slice_in_dim(rows, row * H, H, 0)
            return jax.lax.dynamic_update_slice(buffer, part, (slot * H, 0, 0))
        part = jax.lax.dynamic_slice_in_dim(rows, row, 1, 0)
        return jax.lax.dynamic_update_slice(buffer, part, (slot, 0, 0, 0))

    def set_row(array, value):
        return array.at[slot].set(value)

    window = state.history.shape[1]
    history = prefilled.tokens[row, :window]
    history = jnp.pad(history, (0, window - history.shape[0]))
    # every filter on, whatever the row uses: each leaves a row it does not apply to as is
    any_settings = dataclasses.replace(
        sampling, top_k_bucket=vocab_size, use_top_p=True, greedy=False
    )
    logits = prefilled.logits[row][None, :vocab_size]
    first = sample(logits, jax.random.fold_in(key, 0)[None], any_settings)[0]  # step 0
    state = DecodeState(
        logits=set_row(state.logits, prefilled.logits[row]),
        cache=KVCache(
            k=[put(b, r) for b, r in zip(state.cache.k, prefilled.k, strict=True)],
            v=[put(b, r) for b, r in zip(state.cache.v, prefilled.v, strict=True)],
            lengths=set_row(state.cache.lengths, prefilled.lengths[row]),
        ),
        history=set_row(state.history, history),
        keys=set_row(state.keys, key),
        step=set_row(state.step, 0),
        max_new=set_row(state.max_new, max_new),
        sampling=dataclasses.replace(
            state.sampling,
            temperature=set_row(state.sampling.temperature, sampling.temperature),
            top_k=set_row(state.sampling.top_k, sampling.top_k),
            top_p=set_row(state.sampling.top_p, sampling.top_p),
            min_p=set_row(state.sampling.min_p, sampling.min_p),
        ),
        done=set_row(state.done, False),
        bad_logits=set_row(state.bad_logits, False),
        drawn=set_row(state.drawn, first),
    )
    return state, first


def release(state: DecodeState, free) -> DecodeState:
    """Rows where `free` (B,) is set stop drawing: a stop string seen, a client gone."""
    return dataclasses.replace(state, done=state.done | free)


def decode(
    graphdef,
    params,
    state: DecodeState,
    stop_ids,
    *,
    num_steps: int,
    vocab_size: int,
    logprobs: int,
    attend_block: int = 0,
    rows: int = 0,
) -> tuple[DecodeState, Emitted]:
    """Draw up to `num_steps` more tokens for every row (rows that are done only give FILL),
    stopping early once every row is done. num_steps: a power of two.

    stop_ids: (K,) ids that end a row. vocab_size: the tokenizer's; ids of a padded embedding
    beyond it are never drawn. logprobs: L > 0 also returns each token's log-probability and
    the L likeliest alternatives. attend_block: read the cache in blocks of this many slots,
    only as far as the longest row (0: every slot, every step). rows: decode only the first
    `rows` rows (0: all), the others being empty: a server with few requests runs a program
    its size (needs attend_block and the folded cache layout).
    """
    if rows and rows < state.done.shape[0]:
        head, out = decode(
            graphdef,
            params,
            first_rows(state, rows),
            stop_ids,
            num_steps=num_steps,
            vocab_size=vocab_size,
            logprobs=logprobs,
            attend_block=attend_block,
        )
        return with_first_rows(state, head), pad_rows(out, state.done.shape[0])
    model = nnx.merge(graphdef, params)
    block_size = model.config.block_size
    B, window = state.history.shape

    def draw(state: DecodeState, out: Emitted, i) -> tuple[jax.Array, DecodeState, Emitted]:
        """Each row's next token, from its logits and its key stream at its step."""
        # row r's stream, its t-th token: fold_in(fold_in(key(seed), r), t)
        keys = jax.vmap(jax.random.fold_in)(state.keys, state.step)
        drawn = sample(state.logits[:, :vocab_size], keys, state.sampling)
        drawn = jnp.where(state.drawn != FILL, state.drawn, drawn)  # drawn by `insert`
        token = jnp.where(state.done, FILL, drawn)  # (B,)
        bad = ~state.done & ~jnp.all(jnp.isfinite(state.logits), axis=-1)
        done = state.done | jnp.isin(token, stop_ids) | (state.step + 1 >= state.max_new)
        write = lambda buffer, value: jax.lax.dynamic_update_index_in_dim(buffer, value, i, 1)  # noqa: E731
        out = dataclasses.replace(out, tokens=write(out.tokens, token))
        if logprobs:
            scores = log_probabilities(state.logits, vocab_size)  # (B, V)
            chosen = jnp.take_along_axis(scores, jnp.maximum(token, 0)[:, None], axis=-1)[:, 0]
            top_logprobs, top_ids = top_k(scores, logprobs)  # (B, L): in the loop
            out = Emitted(
                tokens=out.tokens,
                logprobs=write(out.logprobs, chosen),
                top_ids=write(out.top_ids, top_ids),
                top_logprobs=write(out.top_logprobs, top_logprobs),
            )
        history = state.history
        if window:  # the newest token at the row's end; a full window slides left by one
            length = state.cache.lengths  # tokens before this one
            slid = jnp.concatenate([history[:, 1:], token[:, None]], axis=1)
            placed = history.at[jnp.arange(B), jnp.minimum(length, window - 1)].set(token)
            history = jnp.where((length < window)[:, None], placed, slid)
            history = jnp.where(state.done[:, None], state.history, history)
        state = dataclasses.replace(
            state,
            history=history,
            step=state.step + 1,
            done=done,
            bad_logits=state.bad_logits | bad,
            drawn=jnp.full_like(state.drawn, FILL),
        )
        return token, state, out

    def advance(token, state: DecodeState) -> DecodeState:
        """The model on the newest tokens: the logits the next draw needs."""
        # rows that are done feed id 0; what they compute is never read
        logits, cache = model(
            jnp.maximum(token, 0)[:, None], cache=state.cache, last_only=True, block=attend_block
        )
        logits = logits[:, -1]
        if window:  # rows past block_size: the whole window again, positions from 0
            windowed = ~state.done & (state.cache.lengths >= block_size)  # (B,)

            def recompute(logits):
                full, _ = model(state.history, last_only=True)
                return jnp.where(windowed[:, None], full[:, -1], logits)

            logits = run_if(jnp.any(windowed), recompute, logits)
        return dataclasses.replace(state, logits=logits, cache=cache)

    # Groups of steps with a fixed trip count, checking between groups whether any row still
    # runs: a GPU decides a data-dependent branch on the host, a pipeline stall, so checking
    # every step would cost a stall per token. Rows that stopped waste at most a group. The
    # model step that closes a group runs only if a row goes on: a request's last token
    # needs no logits after it (a one-token request is a prefill and a draw).
    group = min(num_steps, STEPS_BETWEEN_CHECKS)
    assert num_steps % group == 0, f"num_steps={num_steps} is not a multiple of {group}"

    def step(carry, _):
        state, out, i = carry
        token, state, out = draw(state, out, i)
        return (advance(token, state), out, i + 1), None

    def run_group(carry):
        carry = jax.lax.scan(step, carry, length=group - 1)[0]
        state, out, i = carry
        token, state, out = draw(state, out, i)
        state = run_if(~jnp.all(state.done), functools.partial(advance, token), state)
        return state, out, i + 1

    def more(carry):
        state, _, i = carry
        return (i < num_steps) & ~jnp.all(state.done)

    L = logprobs
    out = Emitted(
        tokens=jnp.full((B, num_steps), FILL, jnp.int32),
        logprobs=jnp.zeros((B, num_steps if L else 0), jnp.float32),
        top_ids=jnp.zeros((B, num_steps if L else 0, L), jnp.int32),
        top_logprobs=jnp.zeros((B, num_steps if L else 0, L), jnp.float32),
    )
    state, out, _ = jax.lax.while_loop(more, run_group, (state, out, jnp.int32(0)))
    return state, out


def first_rows(state: DecodeState, rows: int) -> DecodeState:
    """The state's first `rows` rows, and the cache's buffers whole: a decode of those rows
    writes their keys and values where they lie."""
    small = jax.tree.map(lambda x: x[:rows] if x.ndim else x, without_buffers(state))
    return dataclasses.replace(
        small, cache=dataclasses.replace(small.cache, k=state.cache.k, v=state.cache.v)
    )


def with_first_rows(state: DecodeState, head: DecodeState) -> DecodeState:
    """`state` with its first rows from `head` (a decoded `first_rows` of it)."""
    rows = head.done.shape[0]
    merged = jax.tree.map(
        lambda x, h: x.at[:rows].set(h) if x.ndim else h,
        without_buffers(state),
        without_buffers(head),
    )
    return dataclasses.replace(
        merged, cache=dataclasses.replace(merged.cache, k=head.cache.k, v=head.cache.v)
    )


def without_buffers(state: DecodeState) -> DecodeState:
    return dataclasses.replace(state, cache=dataclasses.replace(state.cache, k=[], v=[]))


def pad_rows(out: Emitted, batch_size: int) -> Emitted:
    """What `rows` rows drew, as `batch_size` rows drew it (the others: FILL, no token)."""

    def pad(x, value=0):
        rows = [(0, batch_size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
        return jnp.pad(x, rows, constant_values=value)

    return Emitted(
        tokens=pad(out.tokens, FILL),
        logprobs=pad(out.logprobs),
        top_ids=pad(out.top_ids),
        top_logprobs=pad(out.top_logprobs),
    )


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


def row_keys(seed, row_ids):
    """Each row's key stream: row r of a request draws from fold_in(key(seed), r)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids)


def prefill_and_start(graphdef, params, tokens, lengths, seed, row_ids, sampling, max_new, **kw):
    """One batch's programs in one: prefill its prompts, start its rows."""
    num_slots, window = kw.pop("num_slots"), kw.pop("window")
    prefilled = prefill(graphdef, params, tokens, lengths, prompt_logprobs=0, **kw)
    keys = row_keys(seed, row_ids)
    return start(prefilled, keys, sampling, max_new, num_slots=num_slots, window=window)


@dataclasses.dataclass
class Engine:
    """Compiled programs of one model, keyed by shapes and static options."""

    bundle: ModelBundle
    programs: dict = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0
    cache_dtype: jnp.dtype | None = None  # None: `default_cache_dtype`

    def __post_init__(self):
        if self.cache_dtype is None:
            self.cache_dtype = default_cache_dtype(self.bundle.dtype, self.mesh is None)

    @property
    def compile_count(self) -> int:
        return len(self.programs)

    def compiled(self, name: str, function: Callable, static: dict, donate: tuple, *args):
        """The program for `function(*args, **static)` at these shapes; a function whose
        first two arguments are (graphdef, params) gets this bundle's.

        The key leaves out `params`: they are this bundle's, fixed for the engine's life, and
        describing their tree is costly (milliseconds per call for a large model).
        """
        uses_model = name in ("prefill", "start", "decode")
        leaves, structure = jax.tree.flatten(args[1:] if uses_model else args)
        signature = tuple(
            (jnp.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves
        )
        key = (name, tuple(sorted(static.items())), structure, signature)
        if key not in self.programs:
            began = time.perf_counter()
            if uses_model:
                jitted = jax.jit(
                    function,
                    static_argnums=0,
                    static_argnames=tuple(static),
                    donate_argnames=donate,
                )
                lowered = jitted.lower(self.bundle.graphdef, *args, **static)
            else:
                jitted = jax.jit(function, static_argnames=tuple(static), donate_argnames=donate)
                lowered = jitted.lower(*args, **static)
            options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
            self.programs[key] = lowered.compile(compiler_options=options)
            self.compile_seconds += time.perf_counter() - began
        return self.programs[key]

    @property
    def mesh(self):
        return self.bundle.mesh

    @property
    def vocab_size(self) -> int:
        return self.bundle.tokenizer.vocab_size

    def cache_sharding(self):
        return None if self.mesh is None else cache_sharding(self.bundle.config, self.mesh)

    def rows(self, value) -> jax.Array:
        """A host array of batch rows, placed like the batch (split over `data` on a mesh)."""
        if self.mesh is None:
            return jnp.asarray(value)
        return global_array(value, batch_sharding(self.mesh, np.ndim(value)))

    def start(self, tokens, lengths, seed, row_ids, sampling, max_new, num_slots, window):
        """A decode state of right-padded prompts (B, P), all rows beginning now."""
        # the settings' static switches matter to the decode program only: starting compiles
        # once per shape, and the switches are put back on the state it returns
        switches = {f: getattr(sampling, f) for f in ("top_k_bucket", "use_top_p", "greedy")}
        args = (
            self.bundle.params,
            self.rows(tokens),
            self.rows(lengths),
            jnp.int32(seed),
            self.rows(row_ids),
            neutral(sampling),
            self.rows(max_new),
        )
        static = dict(
            num_slots=self.slots(num_slots),
            window=window,
            cache_sharding=self.cache_sharding(),
            cache_dtype=self.cache_dtype,
            vocab_size=self.vocab_size,
        )
        state = self.compiled("start", prefill_and_start, static, (), *args)(*args)
        return dataclasses.replace(state, sampling=dataclasses.replace(state.sampling, **switches))

    def prefill(self, tokens, lengths, prompt_logprobs: int = 0) -> Prefilled:
        args = (self.bundle.params, self.rows(tokens), self.rows(lengths))
        static = dict(
            cache_sharding=self.cache_sharding(),
            cache_dtype=self.cache_dtype,
            prompt_logprobs=prompt_logprobs,
            vocab_size=self.vocab_size,
        )
        return self.compiled("prefill", prefill, static, (), *args)(*args)

    def empty(self, batch_size: int, num_slots: int, window: int) -> DecodeState:
        bundle = self.bundle
        num_slots = self.slots(num_slots)
        state = empty_state(
            bundle.config,
            batch_size,
            num_slots,
            window,
            self.vocab_size,
            self.cache_dtype,
            self.mesh is None,
        )
        if self.mesh is not None:  # rows over `data`, the cache's heads as prefill places them
            state = jax.tree.map(
                lambda x: jax.device_put(x, batch_sharding(self.mesh, x.ndim)), state
            )
            cache = self.cache_sharding()
            state.cache.k = [jax.device_put(k, cache) for k in state.cache.k]
            state.cache.v = [jax.device_put(v, cache) for v in state.cache.v]
        return state

    def insert(
        self, state, prefilled, row: int, slot: int, seed: int, row_id: int, sampling, max_new
    ):
        """Row `row` of `prefilled` into slot `slot`, drawing from key stream `row_id` of
        `seed`: (the state, the row's first token). Compiled once per prefilled shape: the
        settings' static switches are left out (they belong to the decode program), so are
        the state's."""
        sampling = neutral(sampling)
        state = dataclasses.replace(state, sampling=neutral(state.sampling))
        args = (
            state,
            prefilled,
            jnp.int32(row),
            jnp.int32(slot),
            jnp.int32(seed),
            jnp.int32(row_id),
            sampling,
            jnp.int32(max_new),
        )
        static = dict(vocab_size=self.vocab_size)
        return self.compiled("insert", insert, static, ("state",), *args)(*args)

    def release(self, state, free) -> DecodeState:
        state = dataclasses.replace(state, sampling=neutral(state.sampling))
        args = (state, self.rows(np.asarray(free, bool)))
        return self.compiled("release", release, {}, ("state",), *args)(*args)

    @property
    def attend_block(self) -> int:
        return ATTEND_BLOCK if jax.default_backend() == "cpu" else 0

    def slots(self, num_slots: int) -> int:
        """Cache slots, rounded up to whole blocks when the cache is read block by block."""
        block = self.attend_block or 1
        return -(-num_slots // block) * block

    @property
    def decodes_first_rows(self) -> bool:
        """Whether `decode(rows=...)` can run a state's first rows only: where the cache is
        read block by block, in the folded layout (one device)."""
        return bool(self.attend_block) and self.mesh is None

    def decode(self, state, stop_ids, num_steps: int, logprobs: int = 0, rows: int = 0):
        """Up to `num_steps` tokens for every row, or for the first `rows` rows only (the
        others must be empty; see `decodes_first_rows`)."""
        if rows and not self.decodes_first_rows:
            raise ValueError("decoding the first rows only needs one CPU device")
        args = (self.bundle.params, state, stop_ids)
        static = dict(
            num_steps=num_steps,
            vocab_size=self.vocab_size,
            logprobs=logprobs,
            attend_block=self.attend_block,
            rows=0 if rows >= state.done.shape[0] else rows,
        )
        return self.compiled("decode", decode, static, ("state",), *args)(*args)


def default_cache_dtype(dtype: str, folded: bool = True) -> jnp.dtype:
    """The dtype a cache is stored in for a model computing in `dtype`: its own, except on a
    CPU. There a bfloat16 cache is stored as its bits (uint16, `model.to_cache`) where the
    attention kernel reads it (folded heads, kernel built): XLA:CPU writes a bfloat16 buffer
    through float32, converting the whole cache at every step, and the bits are written in
    place. Any other 16-bit cache on a CPU is kept in float32, which XLA's attention reads
    without converting (gpt2 in bfloat16, batch 8, prompt 512: 179 ms/step against 66). The
    numbers are the same in every case: keys and values are computed in the model's dtype and
    attention widens them to float32 exactly; float32 takes twice the memory and reads."""
    if jax.default_backend() != "cpu":
        return jnp.dtype(dtype)
    if jnp.dtype(dtype) == jnp.bfloat16 and folded and decode_attention.available():
        return jnp.dtype(jnp.uint16)
    return jnp.dtype(jnp.float32)


def neutral(sampling: SamplingParams) -> SamplingParams:
    """The settings without their static switches, for programs that only store them."""
    return dataclasses.replace(sampling, top_k_bucket=0, use_top_p=False, greedy=False)


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
