"""Invariants of the GPT module on tiny configs: causality, nanoGPT's init, dropout only in
training, jit == no-jit, and the cache path against the plain forward."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogpt_jax.config import PRESETS, GPTConfig
from nanogpt_jax.errors import UserError
from nanogpt_jax.model import GPT, Linear, init_cache

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def test_logits_are_causal():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    changed = ids.at[:, 7:].set((ids[:, 7:] + 1) % 64)
    a, _ = model(ids)
    b, _ = model(changed)
    assert a.shape == (2, 12, 64) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


def test_initialisation_follows_nanogpt():
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=128)
    model = GPT(config, rngs=nnx.Rngs(0))
    block = model.h[0]
    assert np.std(np.asarray(model.wte.embedding[...])) == pytest.approx(0.02, rel=0.05)
    assert np.std(np.asarray(block.mlp.c_fc.weight[...])) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    assert np.std(np.asarray(block.attn.c_proj.weight[...])) == pytest.approx(residual, rel=0.05)
    assert np.std(np.asarray(block.mlp.c_proj.weight[...])) == pytest.approx(residual, rel=0.05)
    assert not np.any(np.asarray(block.attn.c_attn.bias[...]))
    np.testing.assert_array_equal(np.asarray(block.ln_1.scale[...]), 1.0)


def test_bias_false_has_no_biases():
    model = GPT(TINY.replace(bias=False), rngs=nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in nnx.iter_graph(model) if isinstance(_, nnx.Param)}
    assert not any(name.endswith("bias") for name in names)


def test_dropout_only_with_rngs():
    model = GPT(TINY.replace(dropout=0.5), rngs=nnx.Rngs(0))
    ids = jnp.arange(10)[None]
    plain_a, _ = model(ids)
    plain_b, _ = model(ids)
    np.testing.assert_array_equal(np.asarray(plain_a), np.asarray(plain_b))
    drop_a, _ = model(ids, rngs=nnx.Rngs(dropout=1))
    drop_b, _ = model(ids, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(np.asarray(drop_a), np.asarray(plain_a))
    assert not np.allclose(np.asarray(drop_a), np.asarray(drop_b))


def test_jit_equals_eager():
    model = GPT(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(2), (3, 16), 0, 64)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)[0]

    np.testing.assert_allclose(
        np.asarray(forward(state, ids)), np.asarray(model(ids)[0]), rtol=1e-5, atol=1e-5
    )


def test_chunked_prefill_through_the_cache_equals_one_pass():
    """Rows of different lengths, each at its own position, written into the cache in two
    calls (the second from where each row ended), give the uncached logits."""
    model = GPT(TINY, rngs=nnx.Rngs(0))
    ids = np.asarray(jax.random.randint(jax.random.key(3), (2, 10), 0, 64))
    lengths = np.array([10, 6])
    first = np.array([7, 3])  # tokens of each row in the first call
    cache = init_cache(TINY, 2, 16, jnp.float32)
    tokens = np.zeros((2, 8), np.int32)
    for b in range(2):
        tokens[b, : first[b]] = ids[b, : first[b]]
    logits_first, cache = model(tokens, cache=cache)
    # the second call starts where each row's real tokens ended, not after the padding
    cache = dataclasses.replace(cache, lengths=jnp.asarray(first))
    tokens = np.zeros((2, 4), np.int32)
    for b in range(2):
        rest = ids[b, first[b] : lengths[b]]
        tokens[b, : len(rest)] = rest
    logits_second, cache = model(tokens, cache=cache)
    assert cache.lengths.tolist() == (first + 4).tolist()
    for b, n in enumerate(lengths):
        expected, _ = model(ids[b : b + 1, :n])
        cached = np.concatenate([logits_first[b, : first[b]], logits_second[b, : n - first[b]]])
        np.testing.assert_allclose(cached, expected[0], atol=1e-5)


def test_presets_and_config_checks():
    assert PRESETS["gpt2-xl"].n_layer == 48 and PRESETS["gpt2-xl"].n_embd == 1600
    assert PRESETS["gpt2-medium"].n_head == 16 and PRESETS["gpt2"].vocab_size == 50257
    assert all(p.activation_function == "gelu_new" for p in PRESETS.values())
    assert GPTConfig().vocab_size == 50304 and GPTConfig().activation_function == "gelu"
    with pytest.raises(UserError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(UserError, match="unknown key"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(UserError, match="expected int"):
        GPTConfig.from_dict({"n_layer": 2.5})
    assert GPTConfig.from_dict({"dropout": 0}).dropout == 0.0  # an int is fine for a float


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = GPT(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert model.h[0].mlp.c_fc.weight[...].dtype == jnp.float32
    logits, _ = model(jnp.arange(8)[None])
    assert logits.dtype == jnp.float32
    # the lm_head accumulates and returns float32: its logits are not rounded to bfloat16
    rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)
    assert np.mean(np.asarray(rounded != logits)) > 0.9


def test_bfloat16_products_add_their_bias_in_float32_and_round_once():
    """bfloat16 x bfloat16 products are exact in float32: summed there with the bias and
    rounded once, the output is the float32 result's nearest bfloat16 (a product rounded to
    bfloat16 before its bias is added is off by an ulp in about a third of the entries)."""
    keys = jax.random.split(jax.random.key(3), 3)
    layer = Linear(
        256,
        96,
        use_bias=True,
        stddev=0.5,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )
    layer.bias[...] = jax.random.normal(keys[0], (96,))
    x = jax.random.normal(keys[1], (4, 256))
    as_bf16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    exact = as_bf16(x) @ as_bf16(layer.weight[...]).T + layer.bias[...]
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    y, expected = np.asarray(y.astype(jnp.float32)), np.asarray(as_bf16(exact))
    assert np.mean(y == expected) > 0.99  # summed in another order, a tie may round apart
    np.testing.assert_allclose(y, expected, rtol=2**-7)


@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("layout", ["folded", "heads"])
def test_reading_the_cache_in_blocks_equals_reading_it_whole(layout, kernels, monkeypatch):
    """attend_filled against the plain masked softmax: rows filled to 1, 63, 64, 65 and 130 of
    192 slots (block edges on both sides), and the same rows beside a longer one, bit for bit;
    folded, with the native kernel (on a CPU) and without."""
    from nanogpt_jax.model import attend_filled

    monkeypatch.setenv("NANOGPT_JAX_KERNELS", kernels)

    B, H, S, D = 5, 3, 192, 16
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (B, H, 1, D))
    k = jax.random.normal(keys[1], (B, H, S, D))
    v = jax.random.normal(keys[2], (B, H, S, D))
    filled = jnp.array([1, 63, 64, 65, 130])
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(D)
    visible = jnp.arange(S)[None, None, None, :] < filled[:, None, None, None]
    weights = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
    expected = jnp.einsum("bhts,bhsd->bhtd", weights, v)

    def blocks(filled):
        if layout == "heads":
            return attend_filled(q, k, v, filled, 64)
        folded = [t.reshape(B * H, *t.shape[2:]) for t in (q, k, v)]
        return attend_filled(*folded, filled, 64).reshape(B, H, 1, D)

    got = blocks(filled)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # a longer row beside them makes every row read more blocks: no row's result changes
    longer = blocks(filled.at[0].set(190))
    np.testing.assert_array_equal(longer[1:], got[1:])


@pytest.mark.parametrize("layout", ["folded", "heads"])
@pytest.mark.parametrize("reach", [1, 63, 64, 65, 130, 192])
def test_both_ways_of_reading_the_cache_in_blocks_agree_bit_for_bit(layout, reach):
    """The loop over the blocks the rows reach and the single product over every block give
    the same bits, whichever attend_filled picks: rows of 1 .. `reach` slots of 192."""
    from nanogpt_jax.model import attend_every_block, attend_reached_blocks

    B, H, S, D, block = 6, 3, 192, 16, 64
    keys = jax.random.split(jax.random.key(reach), 3)
    q, k, v = (jax.random.normal(key, (B, H, n, D)) for key, n in zip(keys, (1, S, S), strict=True))
    filled = jnp.array([1, 2, 64, 65, 100, 192]).clip(max=reach)
    per_row = filled
    if layout == "folded":
        q, k, v = (t.reshape(B * H, *t.shape[2:]) for t in (q, k, v))
        per_row = jnp.repeat(filled, H)
    reached = (reach + block - 1) // block
    looped = jax.jit(attend_reached_blocks, static_argnums=5)(q, k, v, per_row, reached, block)
    at_once = jax.jit(attend_every_block, static_argnums=4)(q, k, v, per_row, block)
    np.testing.assert_array_equal(at_once, looped)


def test_a_bfloat16_lookup_has_the_plain_lookups_gradients(monkeypatch):
    """Training in bfloat16 over float32 parameters: the token and position tables get the same
    gradients through `look_up`, which takes 16-bit rows as their bits, as through nnx.Embed."""
    import nanogpt_jax.model

    model = GPT(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, TINY.vocab_size)

    def loss(model):
        logits, _ = model(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1, 5])

    grads = nnx.to_pure_dict(nnx.grad(loss)(model))
    monkeypatch.setattr(nanogpt_jax.model, "look_up", lambda table, ids: table(ids))
    expected = nnx.to_pure_dict(nnx.grad(loss)(model))
    for table in ("wte", "wpe"):
        got, want = grads[table]["embedding"], expected[table]["embedding"]
        np.testing.assert_array_equal(got, want)
        assert np.abs(np.asarray(got, np.float32)).max() > 0, table
