"""The GPT-2 language model as a Flax NNX module, with an optional KV cache.

Shapes, used in every comment and einsum below:
    B batch, T time (tokens in this call), C channels (n_embd), H heads, D head dim (C // H),
    V vocabulary (config.vocab_size, possibly padded), S cache slots.

Parameter names follow GPT-2's (wte, wpe, h.N.ln_1, attn.c_attn, attn.c_proj, mlp.c_fc,
mlp.c_proj, ln_f), so converting PyTorch weights is a table lookup. The lm_head is tied to wte.

Cached calls: each row keeps its own length, and a token's cache slot is its position, so rows
of different lengths (and rows that joined a running batch at different times) share one cache
without padding in front. A call's T tokens of row b go to slots lengths[b] .. lengths[b]+T-1;
slots past a row's length hold nothing it may attend to.

    slot:      0    1    2    3    4    5    6    7
    row 0:     a    b    c  | next ->                lengths[0] = 3
    row 1:     d    e    f    g    h  | next ->      lengths[1] = 5
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nanogpt_jax.config import GPTConfig
from nanogpt_jax.kernels import decode_attention
from nanogpt_jax.kernels import rows_times as kernel


def normal(stddev: float):
    return nnx.initializers.normal(stddev=stddev)


def residual_std(config: GPTConfig) -> float:
    """GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * config.n_layer)


class Linear(nnx.Module):
    """y = x W^T + b, with W stored (out, in) as in PyTorch's nn.Linear. XLA:CPU multiplies the
    few rows of a decode step by a weight in this layout 15-20% faster than by Flax's (in, out)
    kernel; on GPU and TPU the layout costs nothing.

    In bfloat16 the products accumulate in float32, the bias is added there, and the sum is
    rounded once. Asked for a bfloat16 product instead, XLA:CPU converts the weight to float32
    at every decode step and multiplies in float32 (gpt2, batch 8: 82 ms/step against 60)."""

    def __init__(self, in_features, out_features, *, use_bias, stddev, dtype, param_dtype, rngs):
        self.weight = nnx.Param(
            normal(stddev)(rngs.params(), (out_features, in_features), param_dtype)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        """(..., in) -> (..., out). A weight may be given more output axes, (*out, in), as
        sharded inference does to place each head's query, key and value together."""
        w = self.weight[...].astype(self.dtype)
        y = rows_times(x.astype(self.dtype), w)
        if self.bias is not None:
            y = y + self.bias[...].reshape(w.shape[:-1])
        return y.astype(self.dtype)


def rows_times(x, w):
    """x (..., in) times w (*out, in) -> (..., *out) in float32, as one product of a matrix of
    rows, as XLA:CPU's bfloat16 kernels want it: given x's leading axes as they are, it
    transposes every weight once per decode loop iteration (gpt2, batch 8: ~20 ms a step),
    and it multiplies a lone row in float32, converting every weight (batch 1: 52 ms a step
    against 21), so a lone 16-bit row goes in as two. float32 numbers are the same either way.
    A decode step's few rows go to a native kernel on a CPU where one is built (see
    `kernels/rows_times.py`): the same products, summed in another order."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if kernel.applies(x, w):
        return kernel.rows_times(rows, w).reshape(lead + w.shape[:-1])
    lone = rows.shape[0] == 1 and w.dtype.itemsize == 2 and jax.default_backend() == "cpu"
    if lone:
        rows = jnp.pad(rows, ((0, 1), (0, 0)))
    y = jax.lax.dot_general(
        rows, w, (((1,), (w.ndim - 1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return y[:1].reshape(lead + w.shape[:-1]) if lone else y.reshape(lead + w.shape[:-1])


def look_up(table: nnx.Embed, ids):
    """The table's rows for ids, in its dtype, as nnx.Embed gives them; a 16-bit table's on a
    CPU as its bits (see `rows_as_bits`: measured there only)."""
    w = jnp.asarray(table.embedding[...], table.dtype)
    if w.dtype.itemsize == 2 and jax.default_backend() == "cpu":
        return rows_as_bits(w, ids)
    return jnp.take(w, ids, axis=0)


@jax.custom_jvp
def rows_as_bits(w, ids):
    """jnp.take(w, ids, axis=0) of a 16-bit w, taken as its bits: given the numbers, XLA:CPU
    converts the whole table to float32 for the sum of a token's two rows and hoists that out
    of the decode loop (gpt2 in bfloat16: a 154 MB table written once per decode call); given
    the bits, it copies them once (77 MB, no conversion). Its derivative is the lookup's, which
    bits alone would not have."""
    bits = jnp.take(jax.lax.bitcast_convert_type(w, jnp.uint16), ids, axis=0)
    return jax.lax.bitcast_convert_type(bits, w.dtype)


@rows_as_bits.defjvp
def rows_as_bits_jvp(primals, tangents):
    w, ids = primals
    return rows_as_bits(w, ids), jnp.take(tangents[0], ids, axis=0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to S slots.

    Layout (B*H, S, D) by default: with a separate batch axis of size 1, XLA:CPU copies the
    whole cache around every in-place write. (B, H, S, D) when heads are sharded over devices.
    A bfloat16 cache may be stored as its bits, uint16 (see `to_cache`).
    """

    k: list[jax.Array]  # n_layer x (B*H, S, D) or (B, H, S, D)
    v: list[jax.Array]  # n_layer x (B*H, S, D) or (B, H, S, D)
    lengths: jax.Array  # (B,) int32: tokens held per row; its next token goes to that slot

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[-2]


def init_cache(
    config: GPTConfig, batch_size: int, num_slots: int, dtype, fold_heads: bool = True
) -> KVCache:
    """An empty cache of `num_slots` slots for `batch_size` rows."""
    B, H = batch_size, config.n_head
    shape = (
        (B * H, num_slots, config.head_dim) if fold_heads else (B, H, num_slots, config.head_dim)
    )
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(config.n_layer)],
        v=[jnp.zeros(shape, dtype) for _ in range(config.n_layer)],
        lengths=jnp.zeros((B,), jnp.int32),
    )


def to_cache(x, buffer):
    """x as `buffer` stores it: in the buffer's dtype, or, in a uint16 buffer, as the bits of
    its bfloat16 numbers. XLA:CPU writes a bfloat16 buffer's rows by converting the whole
    buffer to float32 and back (gpt2, batch 8, 640 slots: 20 ms a step for the writes alone);
    it writes a uint16 one in place."""
    if buffer.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(buffer.dtype)


def from_cache(buffer):
    """The numbers a cache buffer holds: a uint16 buffer holds bfloat16 bits (`to_cache`)."""
    if buffer.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(buffer, jnp.bfloat16)
    return buffer


def write_rows(buffer, new, at):
    """buffer (B*H, S, D) or (B, H, S, D) with each row's new (.., T, D) written from slot
    at[b] on. One slot for every row (a prefill into a fresh cache) is a plain slice update.
    A folded buffer may hold more rows than `new`: rows past new's are left as they are."""
    if at.ndim == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0,) * (buffer.ndim - 2) + (at, 0))
    if buffer.ndim == 3:  # heads folded into the batch: row b's heads are rows b*H .. b*H+H-1
        at = jnp.repeat(at, new.shape[0] // at.shape[0])
        if new.shape[0] < buffer.shape[0]:  # the first rows only, written where they lie
            slots = at[:, None] + jnp.arange(new.shape[1])  # (rows, T)
            # clipped as dynamic_update_slice clips: a row past the last slot (one that has
            # outgrown block_size, its logits recomputed) writes the last slot either way
            return buffer.at[jnp.arange(new.shape[0])[:, None], slots].set(new, mode="clip")
    write = jax.vmap(
        lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (0,) * (b.ndim - 2) + (i, 0))
    )
    return write(buffer, new, at)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.n_head = config.n_head
        linear = dict(use_bias=config.bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # query, key, value projections for all heads, in one matmul
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, stddev=0.02, **linear)
        # GPT-2 scales residual projections down by sqrt(2 * n_layer) at init
        self.c_proj = Linear(config.n_embd, config.n_embd, stddev=residual_std(config), **linear)
        self.attn_dropout = nnx.Dropout(config.dropout)
        self.resid_dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, mask, kv=None, index=None, rngs=None, filled=None, block=0):
        """x: (B, T, C); mask: (B, 1, T, T or S); kv: this layer's cached (k, v) or None;
        index: () or (B,) slot of each row's first token in the cache. filled: (B,) slots each
        row may see, for a one-token step that reads the cache in blocks of `block` slots only
        as far as the longest row (see `attend_filled`).

        Attention runs in the cache's layout: heads folded into the batch, (B*H, ...), or not.
        """
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        # split as nanoGPT does, then move heads before time (for one token, no data moves)
        qkv = self.c_attn(x).reshape(B, T, 3, C)  # sharded inference's c_attn gives (3, C) already
        q, k, v = (qkv[:, :, i].reshape(B, T, H, D).transpose(0, 2, 1, 3) for i in range(3))
        if kv is not None:
            # write this call's keys and values into the cache, then attend over all S slots
            if kv[0].ndim == 3:
                q, k, v = (t.reshape(B * H, T, D) for t in (q, k, v))  # (B*H, T, D)
            k = write_rows(kv[0], to_cache(k, kv[0]), index)
            v = write_rows(kv[1], to_cache(v, kv[1]), index)
            kv = (k, v)  # 2 x (B*H, S, D) or (B, H, S, D)
            if filled is not None:
                y = attend_filled(q, k, v, filled, block).astype(x.dtype)  # like q
                y = y.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, C)
                return self.c_proj(y), kv
            k, v = from_cache(k), from_cache(v)
        # scores summed and kept in float32 (a bfloat16 model's are not rounded to bfloat16, as
        # a decode step's are not), softmax in float32; masked entries get the most negative
        # finite value, not -inf, so a row with nothing to attend to (a padding slot) stays finite
        scores = jnp.einsum(
            "...td,...sd->...ts", q, k.astype(q.dtype), preferred_element_type=jnp.float32
        )
        att = (scores / math.sqrt(D)).reshape(B, H, T, -1)  # (B, H, T, S)
        att = jnp.where(mask, att, jnp.finfo(jnp.float32).min)
        att = jax.nn.softmax(att, axis=-1).astype(x.dtype)
        att = self.attn_dropout(att, deterministic=rngs is None, rngs=rngs)
        y = jnp.einsum("...ts,...sd->...td", att.reshape(q.shape[:-1] + (-1,)), v.astype(x.dtype))
        y = y.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, C)  # re-assemble heads
        y = self.resid_dropout(self.c_proj(y), deterministic=rngs is None, rngs=rngs)
        return y, kv


def attend_filled(q, k, v, filled, block: int):
    """One query per row against its cache, read block by block only as far as the longest
    row has filled it: a softmax carried across blocks (running maximum, sum and output).

    q: (B*H, 1, D) or (B, H, 1, D); k, v: (B*H, S, D) or (B, H, S, D), S a multiple of
    `block` (folded, they may hold more rows than q: only q's are read); filled: (B,) slots
    each row may see. A block past a row's own length adds exactly nothing to it (its weights
    are exp(-huge) = 0), so a row's result does not depend on how far the other rows reach.

    On a CPU, with the folded layout, the native kernel reads each row's own slots where they
    lie and nothing past them (`kernels/decode_attention.py`). Otherwise two ways give the
    same bits. A loop over the blocks some row has reached slices each out of the cache, a
    copy on a CPU before its products; one product over every block copies nothing but reads
    the empty ones too. Past half the cache, the single product is cheaper.
    """
    rows = q.shape[0]
    per_row = jnp.repeat(filled, rows // filled.shape[0]) if q.ndim == 3 else filled
    if decode_attention.applies(q, k, v):  # each row's own slots, read where they lie
        return decode_attention.attend_filled(q, k, v, per_row)
    k, v = from_cache(k), from_cache(v)
    reached = (jnp.max(filled) + block - 1) // block
    every = k.shape[-2] // block
    return jax.lax.cond(
        2 * reached > every,
        lambda: attend_every_block(q, k, v, per_row, block),
        lambda: attend_reached_blocks(q, k, v, per_row, reached, block),
    )


def attend_reached_blocks(q, k, v, per_row, reached, block: int):
    """attend_filled's loop over the first `reached` blocks; per_row: q's leading shape."""
    per_row = per_row.reshape(per_row.shape + (1,) * (q.ndim - 1))  # against (.., 1, block)
    scale = math.sqrt(q.shape[-1])
    lowest = jnp.finfo(jnp.float32).min
    query = q.astype(jnp.float32)  # small products: float32 runs them fastest on a CPU

    def add_block(i, carry):
        peak, total, out = carry  # (.., 1, 1), (.., 1, 1), (.., 1, D)
        at, size = (0,) * (q.ndim - 2) + (i * block, 0), q.shape[:-2] + (block, q.shape[-1])
        keys = jax.lax.dynamic_slice(k, at, size)
        values = jax.lax.dynamic_slice(v, at, size)
        scores = jnp.einsum("...td,...sd->...ts", query, keys.astype(jnp.float32)) / scale
        slots = i * block + jnp.arange(block)
        scores = jnp.where(slots < per_row, scores, lowest)  # (.., 1, block)
        new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1, keepdims=True))
        weights = jnp.exp(scores - new_peak)
        rescale = jnp.exp(peak - new_peak)
        total = total * rescale + jnp.sum(weights, axis=-1, keepdims=True)
        out = out * rescale + jnp.einsum("...ts,...sd->...td", weights, values.astype(jnp.float32))
        return new_peak, total, out

    shape = q.shape[:-1] + (1,)
    start = (jnp.full(shape, lowest), jnp.zeros(shape), jnp.zeros(q.shape, jnp.float32))  # f32
    _, total, out = jax.lax.fori_loop(0, reached, add_block, start)
    return out / total


def attend_every_block(q, k, v, per_row, block: int):
    """attend_filled's numbers from every block at once: the cache seen as (.., N, block, D)
    without a copy, each block's scores, weights and weighted values in one product each, then
    the blocks' running maximum, sum and output carried in the loop's order."""
    per_row = per_row.reshape(per_row.shape + (1,) * q.ndim)  # against (.., N, 1, block)
    scale = math.sqrt(q.shape[-1])
    lowest = jnp.finfo(jnp.float32).min
    N = k.shape[-2] // block
    k, v = k[: q.shape[0]], v[: q.shape[0]]  # a folded cache may hold more rows: q's only
    as_blocks = q.shape[:-2] + (N, block, q.shape[-1])
    keys, values = (t.reshape(as_blocks).astype(jnp.float32) for t in (k, v))
    scores = jnp.einsum("...td,...nsd->...nts", q.astype(jnp.float32), keys) / scale
    slots = jnp.arange(N)[:, None, None] * block + jnp.arange(block)  # (N, 1, block)
    scores = jnp.where(slots < per_row, scores, lowest)  # (.., N, 1, block)
    peaks = jax.lax.cummax(jnp.max(scores, axis=-1, keepdims=True), axis=q.ndim - 2)
    weights = jnp.exp(scores - peaks)
    sums = jnp.sum(weights, axis=-1, keepdims=True)  # (.., N, 1, 1)
    outs = jnp.einsum("...nts,...nsd->...ntd", weights, values)  # (.., N, 1, D)

    def add_block(i, carry):
        peak, total, out = carry  # (.., 1, 1), (.., 1, 1), (.., 1, D)
        new_peak = jnp.take(peaks, i, axis=-3)
        rescale = jnp.exp(peak - new_peak)
        total = total * rescale + jnp.take(sums, i, axis=-3)
        return new_peak, total, out * rescale + jnp.take(outs, i, axis=-3)

    shape = q.shape[:-1] + (1,)
    start = (jnp.full(shape, lowest), jnp.zeros(shape), jnp.zeros(q.shape, jnp.float32))
    _, total, out = jax.lax.fori_loop(0, N, add_block, start)
    return out / total


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = dict(use_bias=config.bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, stddev=0.02, **linear)
        self.c_proj = Linear(
            4 * config.n_embd, config.n_embd, stddev=residual_std(config), **linear
        )
        self.approximate_gelu = config.activation_function == "gelu_new"
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, rngs=None):
        x = jax.nn.gelu(self.c_fc(x), approximate=self.approximate_gelu)  # (B, T, 4C)
        return self.dropout(self.c_proj(x), deterministic=rngs is None, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(
            epsilon=1e-5, use_bias=config.bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = nnx.LayerNorm(config.n_embd, **norm)
        self.attn = CausalSelfAttention(config, **layer)
        self.ln_2 = nnx.LayerNorm(config.n_embd, **norm)
        self.mlp = MLP(config, **layer)

    def __call__(self, x, mask, kv=None, index=None, rngs=None, filled=None, block=0):
        y, kv = self.attn(self.ln_1(x), mask, kv, index, rngs, filled, block)
        x = x + y
        x = x + self.mlp(self.ln_2(x), rngs)
        return x, kv


class GPT(nnx.Module):
    """GPT-2. `dtype` is the compute dtype; parameters are kept in `param_dtype`."""

    def __init__(
        self,
        config: GPTConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.config = config
        self.dtype = dtype
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        embed = dict(embedding_init=normal(0.02), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, **embed)
        self.wpe = nnx.Embed(config.block_size, config.n_embd, **embed)
        self.drop = nnx.Dropout(config.dropout)
        self.h = nnx.List([Block(config, **layer) for _ in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(
            config.n_embd,
            epsilon=1e-5,
            use_bias=config.bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        start: jax.Array | None = None,
        last: jax.Array | None = None,
        last_only: bool = False,
        rngs: nnx.Rngs | None = None,
        block: int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """Float32 logits (B, T, V), and the cache with these tokens added (None without one).

        tokens: (B, T) ids. Without a cache: positions (B, T), default 0..T-1, and start (B,)
        the first real token of each left-padded row. With a cache, row b's tokens take the
        slots cache.lengths[b] + 0..T-1, and by default those positions (past block_size they
        are clamped: only a row that has outgrown its window gets there, and its logits are
        not used).
        last: (B,) logits of that position of each row only, (B, 1, V), or (B, L) of those
        L positions, (B, L, V); last_only: of the last position. Dropout runs only when `rngs`
        is given (training). block: a one-token step reads the cache in blocks of this many
        slots, only as far as its longest row (0: every slot; see `attend_filled`); only such a
        step may be given a folded cache of more rows than `tokens`.
        """
        B, T = tokens.shape
        if cache is not None:
            slots = cache.lengths[:, None] + jnp.arange(T)  # (B, T)
            mask = (jnp.arange(cache.num_slots)[None, None, :] <= slots[:, :, None])[:, None]
            positions = slots if positions is None else positions  # the slot, unless told
            positions = jnp.minimum(positions, self.config.block_size - 1)
        else:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(T), (B, T))
            mask = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None, None]  # (1,1,T,T)
            if start is not None:  # (B, 1, T, T): no row attends to its left padding
                mask = mask & (jnp.arange(T)[None, :] >= start[:, None])[:, None, None, :]
        x = look_up(self.wte, tokens) + look_up(self.wpe, positions)  # (B, T, C)
        x = self.drop(x, deterministic=rngs is None, rngs=rngs)

        if cache is None:
            for block in self.h:
                x, _ = block(x, mask, rngs=rngs)
        else:
            new_k, new_v = [], []
            blockwise = block and T == 1 and cache.num_slots % block == 0
            filled = cache.lengths + 1 if blockwise else None  # slots up to the new token
            for layer, k, v in zip(self.h, cache.k, cache.v, strict=True):
                x, (k, v) = layer(x, mask, (k, v), cache.lengths, rngs, filled, block)
                new_k.append(k)
                new_v.append(v)
            cache = KVCache(new_k, new_v, cache.lengths + T)

        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        elif last is not None:
            at = last[:, None, None] if last.ndim == 1 else last[:, :, None]
            x = jnp.take_along_axis(x, at, axis=1)  # (B, 1 or L, C)
        x = self.ln_f(x)
        # lm_head tied to the token embedding: (B, T, C) x (V, C) -> (B, T, V), in float32
        logits = rows_times(x, self.wte.embedding[...].astype(x.dtype))
        return logits, cache
