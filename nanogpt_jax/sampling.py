"""Next-token selection: small pure functions of (logits, key).

Order, as in Hugging Face and nanoGPT: temperature -> top-k -> top-p -> min-p -> draw.
Each filter sets the logits of removed tokens to -inf; the draw is a categorical sample from
what is left. All of it runs in float32, whatever dtype the model computes in.

Ties: a filter keeps every token whose logit equals its cut-off value, so top_k=k may keep more
than k tokens when several share the k-th largest logit (as `torch.topk` thresholding does in
nanoGPT), and top-p keeps all tokens tied with the last one needed to reach mass p. Greedy
decoding (temperature 0) picks the lowest id among tied maxima.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from nanogpt_jax.errors import UserError
from nanogpt_jax.kernels import kth_largest as native_kth_largest

# without the native kernel (a GPU, or a CPU without a compiler), top-k buckets up to this
# read the k-th largest logit from `top_k`; larger ones bisect for it (on a CPU, 50,257
# logits in a decode loop, a row: k 256 0.24 ms, 512 0.37, 1024 0.70, 4096 2.0; bisection
# 0.71 ms whatever k; 16 rows: 5.2, 6.7, 10.7, 32 and 11.2 ms)
TOP_K_BY_SORT = 512

# tokens per block of the draw's CDF (see `draw`)
DRAW_BLOCK = 256


def top_k(x, k: int):
    """`jax.lax.top_k` over the last axis, for use inside a loop: the k largest values,
    descending, and their ids.

    Inside a loop XLA:CPU can run a batched top-k as a sort of every row (50,257 logits: ~12
    ms a row in a scan of any batch, and in the decode loop at batch 1) but selects from a
    lone row in 0.13 ms, so on a CPU the rows go one at a time: at most ~0.3 ms a row where
    the batched form is fast (outside a loop, 16 rows take 1.4 ms). The result is the same
    either way: a selection, no arithmetic."""
    if jax.default_backend() != "cpu":
        return jax.lax.top_k(x, k)
    rows = x.reshape(-1, x.shape[-1])
    values, ids = jax.lax.map(lambda row: jax.lax.top_k(row, k), rows)
    return values.reshape(x.shape[:-1] + (k,)), ids.reshape(x.shape[:-1] + (k,))


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Traced values change without recompiling; the static ones set shapes or skip work.

    The traced values are scalars, one setting for every row, or (B,) arrays, one per row
    (a server's rows are different requests). Per row: temperature 0 is greedy, top_k 0 and
    top_p 1 keep everything.
    """

    temperature: jax.Array  # () or (B,) float32; 0 means greedy
    top_k: jax.Array  # () or (B,) int32; ignored when top_k_bucket == 0
    top_p: jax.Array  # () or (B,) float32; 1 keeps everything
    min_p: jax.Array  # () or (B,) float32; 0 keeps everything
    top_k_bucket: int = dataclasses.field(default=0, metadata=dict(static=True))
    use_top_p: bool = dataclasses.field(default=False, metadata=dict(static=True))
    greedy: bool = dataclasses.field(default=False, metadata=dict(static=True))  # every row

    @classmethod
    def create(
        cls,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        min_p: float = 0.0,
        vocab_size: int | None = None,
    ) -> SamplingParams:
        check_sampling_options(temperature, top_k, top_p, min_p)
        if top_k is not None and vocab_size is not None:
            top_k = min(top_k, vocab_size)
        # top-k reads the k-th largest logit through lax.top_k over a power-of-two bucket, so
        # top_k=50 and top_k=60 share one compiled program
        bucket = 0 if top_k is None else next_power_of_two(top_k)
        if vocab_size is not None:
            bucket = min(bucket, vocab_size)
        return cls(
            temperature=jnp.float32(temperature),
            top_k=jnp.int32(top_k or 0),
            top_p=jnp.float32(top_p),
            min_p=jnp.float32(min_p),
            top_k_bucket=bucket,
            use_top_p=top_p < 1.0,
            greedy=temperature == 0,
        )

    def for_rows(self, batch_size: int) -> SamplingParams:
        """The same setting as (B,) arrays, one entry per row."""
        rows = lambda x: jnp.broadcast_to(x, (batch_size,))  # noqa: E731
        return dataclasses.replace(
            self,
            temperature=rows(self.temperature),
            top_k=rows(self.top_k),
            top_p=rows(self.top_p),
            min_p=rows(self.min_p),
        )


def per_row(x):
    """A scalar or (B,) setting, shaped to broadcast against (B, V) logits."""
    return jnp.reshape(x, (-1, 1))


def check_sampling_options(temperature, top_k, top_p, min_p) -> None:
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or temperature < 0:
        raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise UserError(f"top_k must be a positive integer or None, got {top_k!r}")
    if not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise UserError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (isinstance(min_p, int | float) and 0.0 <= min_p <= 1.0):
        raise UserError(f"min_p must be in [0, 1], got {min_p!r}")


def apply_temperature(logits, params: SamplingParams):
    # temperature 0 is handled by greedy selection in `sample`; divide by 1 instead of 0 here
    safe = jnp.where(params.temperature > 0, params.temperature, 1.0)
    return logits / per_row(safe)


def apply_top_k(logits, params: SamplingParams):
    """Remove every token below its row's k-th largest logit. On a CPU the native kernel finds
    that cut for every row in one call (gpt2, 8 rows in a decode loop: 0.4 ms a step against
    1.5 row by row); the same number as the other two ways, so the same tokens are kept."""
    if not params.top_k_bucket:
        return logits
    k = jnp.broadcast_to(params.top_k, logits.shape[:1])  # (B,)
    if native_kth_largest.available():  # every row in one call, the same cut
        kth = native_kth_largest.kth_largest(logits, jnp.maximum(k, 1))[:, None]
    elif params.top_k_bucket <= TOP_K_BY_SORT:
        values, _ = top_k(logits, params.top_k_bucket)  # (B, bucket), descending
        kth = jnp.take_along_axis(values, jnp.maximum(k - 1, 0)[:, None], axis=-1)
    else:
        kth = kth_largest(logits, jnp.maximum(k, 1))[:, None]
    kth = jnp.where(k[:, None] > 0, kth, -jnp.inf)  # (B, 1); a row without top-k keeps all
    return jnp.where(logits < kth, -jnp.inf, logits)


def kth_largest(logits, k):
    """Each row's k-th largest logit (B,): the largest bit pattern with at least k logits at
    or above it is the k-th largest's own (exact; a full sort is 16x slower)."""
    keys = ordered_bits(logits)
    enough = lambda above: jnp.sum(above, axis=-1) >= k  # noqa: E731
    return float_of_ordered_bits(largest_cut(keys, enough))


def largest_cut(keys, enough):
    """Each row's largest t (B,) for which `enough(keys >= t)` holds, by bisection over the
    32 bits of `ordered_bits` keys (B, V): 32 passes over the vocabulary. `enough` must hold
    at t = 0 and, once false, stay false for every larger t."""

    def bisect(_, bounds):
        lo, hi = bounds  # enough at lo, not at hi (hi may be max+1)
        mid = lo + (hi - lo) // 2
        ok = enough(keys >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    B = keys.shape[0]
    lo = jnp.zeros((B,), jnp.uint32)
    hi = jnp.full((B,), jnp.iinfo(jnp.uint32).max, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
    return lo


def apply_top_p(logits, params: SamplingParams):
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches top_p.

    That set is {logit >= t}, t the largest logit value with mass(logits >= t) >= top_p. t is
    found by bisection over the float32 bit patterns (32 passes over the vocabulary, exact):
    sorting 50k logits per row per step costs far more.
    """
    if not params.use_top_p:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)  # (B, V); removed tokens have 0
    keys = ordered_bits(logits)  # (B, V) uint32, same order as the logits
    mass = lambda above: jnp.sum(jnp.where(above, probs, 0.0), axis=-1)  # noqa: E731
    lo = largest_cut(keys, lambda above: mass(above) >= params.top_p)
    # a row with top_p 1 keeps everything, exactly as when no row uses top-p (a rounded mass
    # of 1.0 could otherwise cut a tail of tokens with next to no probability)
    keep = (keys >= lo[:, None]) | (per_row(params.top_p) >= 1.0)
    return jnp.where(keep, logits, -jnp.inf)


def ordered_bits(x):
    """float32 -> uint32 with the same order (negative floats reversed, sign bit flipped)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def float_of_ordered_bits(keys):
    """The inverse of `ordered_bits`."""
    positive = (keys >> 31) == 1
    bits = jnp.where(positive, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def apply_min_p(logits, params: SamplingParams):
    """Keep tokens with prob >= min_p * max prob, i.e. logit >= max logit + log(min_p). On a
    CPU its two passes over the logits run only when some row sets min_p (see `only_if`)."""

    def cut(logits):
        cutoff = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(per_row(params.min_p))
        return jnp.where(logits < cutoff, -jnp.inf, logits)  # min_p 0: a cutoff of -inf

    return only_if(jnp.any(params.min_p > 0), cut, logits)


def only_if(needed, change, x):
    """change(x) where `needed` (a traced bool), else x, which change(x) would give anyway. On a
    CPU a conditional skips the work for a few microseconds; elsewhere the work is done, as a
    GPU's conditional may read its predicate back to the host: a stall in a decode loop.
    `engine.run_if`'s one-pass while loop, which spares the KV cache a copy, is slower for
    these small operands (gpt2's 8-row draw: 0.68 ms a step against 0.51)."""
    if jax.default_backend() != "cpu":
        return change(x)
    return jax.lax.cond(needed, change, lambda x: x, x)


def filter_logits(logits, params: SamplingParams):
    """Float32 logits (B, V) with every token the filters remove set to -inf."""
    logits = apply_temperature(logits.astype(jnp.float32), params)
    logits = apply_top_k(logits, params)
    logits = apply_top_p(logits, params)
    return apply_min_p(logits, params)


def first_max(x):
    """The index of each row's largest value along the last axis, the first among ties, or of
    its first NaN: `jnp.argmax`'s answer. On a CPU it is taken as the maximum, then the first
    index holding it: XLA:CPU's argmax, one reduction over (value, index) pairs, is 3x slower
    (gpt2's 50,257 logits in a decode loop, 8 rows: 0.98 ms against 0.31)."""
    if jax.default_backend() != "cpu":
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    peak = jnp.max(x, axis=-1, keepdims=True)  # NaN if the row holds one
    hit = (x == peak) | jnp.isnan(x)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, ids, x.shape[-1]), axis=-1)


def draw(logits, key):
    """One categorical draw from logits (V,) by inverse CDF: a single uniform per row instead of
    the V Gumbel variates `jax.random.categorical` generates.

    The CDF is taken in blocks of DRAW_BLOCK tokens: each block's total, the running totals of
    the blocks, then the running sum inside the one block the uniform falls in; the weights
    are the softmax's before it divides by their total, which scales the uniform instead. A
    running sum over the whole vocabulary is one slow pass on a CPU: gpt2's 50,257 logits in
    a decode loop, 8 rows, drew in 2.1 ms a step with it and in 0.45 ms this way."""
    weights = jnp.exp(logits - jnp.max(logits))  # the softmax, not divided by its total
    V = weights.shape[0]
    blocks = -(-V // DRAW_BLOCK)
    weights = jnp.pad(weights, (0, blocks * DRAW_BLOCK - V)).reshape(blocks, DRAW_BLOCK)
    ends = jnp.cumsum(jnp.sum(weights, axis=1))  # the (unnormalised) CDF at each block's end
    u = jax.random.uniform(key) * ends[-1]
    # the first block whose end exceeds u, and the first token in it whose CDF does: a token
    # of probability 0 never is. Where rounding leaves u at the total, the last block holding
    # any weight is taken; past that block's own running sum, its last token of weight.
    block = jnp.minimum(jnp.sum(ends <= u), jnp.sum(ends < ends[-1]))
    before = jnp.where(block > 0, ends[block - 1], 0.0)
    inside = jax.lax.dynamic_index_in_dim(weights, block, keepdims=False)
    at = jnp.sum(before + jnp.cumsum(inside) <= u)
    last = DRAW_BLOCK - 1 - jnp.argmax(inside[::-1] > 0)
    return block * DRAW_BLOCK + jnp.where(at < DRAW_BLOCK, at, last)  # < V: padding weighs 0


def sample(logits, keys, params: SamplingParams):
    """One token id per row. logits: (B, V); keys: (B,) typed PRNG keys, one per row. The
    greedy pick of rows at temperature 0, passes over every row's logits, is taken on a CPU
    only when some row is at temperature 0 (with min-p's passes skipped too, gpt2's 8 rows at
    nanoGPT's settings draw in 0.51 ms a step against 0.64)."""
    logits = logits.astype(jnp.float32)
    if params.greedy:
        return first_max(logits)
    drawn = jax.vmap(draw)(filter_logits(logits, params), keys).astype(jnp.int32)
    greedy_rows = jnp.reshape(params.temperature, (-1,)) == 0
    pick_greedy = lambda drawn: jnp.where(greedy_rows, first_max(logits), drawn)  # noqa: E731
    return only_if(jnp.any(greedy_rows), pick_greedy, drawn)
