"""The sampling engine: cached decoding equals recomputation, greedy equals transformers,
reproducible key streams, one compile per bucket, stops, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    LOGIT_TOLERANCE,
    distinct_new,
    hf_gpt2,
    max_abs_diff,
    relative_logit_error,
)
from flax import nnx

import nanogpt_jax
from nanogpt_jax.bundle import make_bundle
from nanogpt_jax.checkpoint import params_of
from nanogpt_jax.config import GPTConfig
from nanogpt_jax.engine import FILL, Engine, engine_of
from nanogpt_jax.errors import UserError
from nanogpt_jax.interop.convert import convert
from nanogpt_jax.kernels import decode_attention
from nanogpt_jax.model import GPT
from nanogpt_jax.sampling import SamplingParams
from nanogpt_jax.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def gpt2_bundle(gpt2_checkpoint):
    path, torch_model = gpt2_checkpoint
    return nanogpt_jax.load(path), torch_model


@pytest.fixture(scope="module")
def char_bundle(char_checkpoint):
    return nanogpt_jax.load(char_checkpoint)


def start_rows(engine, rows, max_new, num_slots=128, window=None, temperature=0.0):
    """A decode state of the rows' prompts, greedy by default, rows 0..n-1 of seed 0."""
    prompt_slots = 16
    tokens = np.zeros((len(rows), prompt_slots), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    lengths = np.array([len(r) for r in rows], np.int32)
    row_ids = np.arange(len(rows), dtype=np.int32)
    sampling = SamplingParams.create(temperature=temperature).for_rows(len(rows))
    window = engine.bundle.config.block_size if window is None else window
    max_new = np.full((len(rows),), max_new, np.int32)
    return engine.start(tokens, lengths, 0, row_ids, sampling, max_new, num_slots, window)


def stepwise_logits(bundle, rows, steps, engine=None):
    """Next-token logits after each greedy step, read from the engine's cached decode."""
    engine = engine or engine_of(bundle)
    state = start_rows(engine, rows, 10_000, num_slots=bundle.config.block_size)
    history, generated = [np.asarray(state.logits)], []
    for _ in range(steps):
        state, out = engine.decode(state, jnp.array([FILL]), 1)
        history.append(np.asarray(state.logits))
        generated.append(np.asarray(out.tokens))
    return history, np.concatenate(generated, axis=1)


def test_cached_decode_equals_full_recompute_past_block_size(gpt2_bundle):
    bundle, _ = gpt2_bundle
    block_size = bundle.config.block_size  # 64
    rows = [[11, 22, 33], list(range(100, 113))]
    steps = 80  # every row crosses block_size
    history, generated = stepwise_logits(bundle, rows, steps)
    worst = 0.0
    for t in range(steps + 1):
        for b, row in enumerate(rows):
            context = (row + generated[b, :t].tolist())[-block_size:]  # nanoGPT's crop
            # right-padded to one length (one compile); causality hides the padding
            padded = np.array([context + [0] * (block_size - len(context))])
            expected = bundle.logits(padded)[0, len(context) - 1]
            worst = max(worst, max_abs_diff(history[t][b], expected))
    scale = max(float(np.abs(h).max()) for h in history)
    print(f"max |cached - recomputed| logit difference over {steps} steps: {worst:.2e}")
    assert worst <= LOGIT_TOLERANCE * scale
    for row in generated:  # the rows wander: a token fed back or a slot off would show
        assert distinct_new(row, 0) > 10, row


def test_decode_stops_calling_the_model_once_every_row_is_done(char_bundle):
    """No model step after a request's last token, and no group of steps after every row is
    done: the cache lengths count the model steps that ran."""
    engine = engine_of(char_bundle)
    rows = [[1] * 16, [1] * 16]
    no_stop = jnp.array([FILL])

    def decode(num_new, num_steps):
        state = start_rows(engine, rows, num_new, num_slots=80, window=0)
        state, out = engine.decode(state, no_stop, num_steps)
        model_steps = int(state.cache.lengths[0]) - 16
        return int(state.step[0]), model_steps, np.asarray(out.tokens)

    assert decode(num_new=1, num_steps=1)[:2] == (1, 0)  # a prefill and a draw
    assert decode(num_new=2, num_steps=2)[:2] == (2, 1)
    assert decode(num_new=10, num_steps=2)[:2] == (2, 2)  # rows go on: their next logits
    # done after 3 tokens: the first group of 16 steps runs, the other three are skipped
    steps, model_steps, written = decode(num_new=3, num_steps=64)
    assert (steps, model_steps) == (16, 15)
    assert np.all(written[:, :3] != FILL) and np.all(written[:, 3:] == FILL)


def test_greedy_equals_transformers_generate(gpt2_bundle):
    bundle, hf_model = gpt2_bundle
    prompts = [[464, 3290, 318], [15496, 11, 616, 1438, 318, 257, 1110, 290], [50256]]
    result = bundle.generate(prompts, max_new_tokens=55, temperature=0.0)  # within block_size
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=int),
                max_new_tokens=55,
                do_sample=False,
                pad_token_id=50256,
                eos_token_id=None,
            )[0].tolist()
        assert result.lengths[i] == len(prompt) + 55
        assert result.tokens[i, : result.lengths[i]].tolist() == expected
        assert distinct_new(expected, len(prompt)) > 10


def test_greedy_past_block_size_equals_nanogpt_crop(gpt2_bundle):
    bundle, hf_model = gpt2_bundle
    prompt = list(range(1000, 1050))
    result = bundle.generate([prompt], max_new_tokens=40, temperature=0.0)
    ids = list(prompt)
    for _ in range(40):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids[-64:]])).logits[0, -1]
        ids.append(int(logits.argmax()))
    assert result.tokens[0].tolist() == ids
    assert distinct_new(ids, len(prompt)) > 10


def test_sample_i_does_not_depend_on_batching(char_bundle):
    options = dict(max_new_tokens=30, temperature=1.0, top_k=20, seed=7)
    five = char_bundle.generate(["ROMEO:"] * 5, **options).texts
    two = char_bundle.generate(["ROMEO:"] * 2, **options).texts
    split = char_bundle.generate(["ROMEO:"] * 5, batch_size=2, **options).texts
    assert two == five[:2]
    assert split == five
    assert len(set(five)) > 1  # the streams differ from each other
    other_seed = char_bundle.generate(["ROMEO:"] * 2, **(options | dict(seed=8))).texts
    assert other_seed != two


def test_sample_does_not_depend_on_the_other_prompts(char_bundle):
    options = dict(max_new_tokens=25, temperature=0.9, seed=3)
    mixed = char_bundle.generate(["ROMEO:", "A longer prompt, padded less."], **options)
    alone = char_bundle.generate(["ROMEO:"], **options)
    assert mixed.texts[0] == alone.texts[0]


def test_one_compile_per_bucket(char_bundle):
    engine = engine_of(char_bundle)
    char_bundle.generate(["ROMEO:"], max_new_tokens=20, temperature=0.8, top_k=50, seed=1)
    compiled = engine.compile_count
    char_bundle.generate(["JULIET: hello"], max_new_tokens=20, temperature=0.8, top_k=50)
    char_bundle.generate(["KING"], max_new_tokens=31, temperature=0.5, top_k=60, seed=2)
    char_bundle.generate(["KING"], max_new_tokens=25, temperature=1.2, top_k=33, min_p=0.1)
    assert engine.compile_count == compiled
    char_bundle.generate(["KING"], max_new_tokens=25, temperature=1.2, top_k=33, top_p=0.9)
    assert engine.compile_count == compiled + 1  # top_p < 1 switches the nucleus filter on


def test_a_stop_string_cuts_the_sample_after_its_first_occurrence(char_bundle):
    options = dict(max_new_tokens=60, temperature=1.0, seed=5)
    free = char_bundle.generate(["ROMEO:", "KING:"], **options)
    stop = free.completions()[0][20:22]  # a two-character string the first sample contains
    stopped = char_bundle.generate(["ROMEO:", "KING:"], stop=[stop], **options)
    for i in range(2):
        text = free.completions()[i]
        cut = text.find(stop)
        expected = text if cut < 0 else text[: cut + len(stop)]
        assert stopped.completions()[i] == expected
        row = stopped.tokens[i]
        assert np.all(row[stopped.lengths[i] :] == FILL) and np.all(row[: stopped.lengths[i]] >= 0)
    assert len(stopped.completions()[0]) <= 22 < len(free.completions()[0])  # it did stop


@pytest.mark.parametrize("chunk_size, boundary", [(16, 16), (None, 32)])
def test_a_stop_string_across_a_chunk_boundary(char_bundle, chunk_size, boundary):
    """A stop whose characters arrive in two decode calls is still found (one token = one
    character here, so new token k ends at character k)."""
    options = dict(max_new_tokens=60, temperature=1.0, seed=12)
    text = char_bundle.generate(["ROMEO:"], **options).completions()[0]
    # the shortest string across the boundary that does not occur earlier in the text
    stop = next(
        text[first : boundary + 2]
        for first in range(boundary - 1, -1, -1)
        if text.find(text[first : boundary + 2]) == first
    )
    assert len(stop) >= 3 and text.find(stop) < boundary < text.find(stop) + len(stop)
    stopped = char_bundle.generate(["ROMEO:"], stop=stop, chunk_size=chunk_size, **options)
    assert stopped.completions()[0] == text[: boundary + 2]
    # streamed, the text shown as it comes ends at the stop too
    pieces = []
    streamed = char_bundle.generate(
        ["ROMEO:"],
        stop=stop,
        chunk_size=chunk_size or boundary,
        on_text=lambda row, piece: pieces.append(piece),
        **options,
    )
    assert "".join(pieces) == streamed.completions()[0] == text[: boundary + 2]


def test_endoftext_given_as_a_string_stops_on_the_token(gpt2_bundle):
    """'<|endoftext|>' is GPT-2's end-of-text token, not five BPE pieces to match as text."""
    bundle, _ = gpt2_bundle
    prompt = [[464, 3290]]
    plain = bundle.generate(prompt, max_new_tokens=40, temperature=0.0).tokens[0, 2:].tolist()
    # end-of-text's output embedding: 1.5x that of the 6th new token, so it wins there
    params = jax.tree.map(np.array, nnx.to_pure_dict(bundle.params))
    params["wte"]["embedding"][50256] = 1.5 * params["wte"]["embedding"][plain[5]]
    boosted = make_bundle(bundle.config, bundle.tokenizer, params)
    free = boosted.generate(prompt, max_new_tokens=40, temperature=0.0).tokens[0, 2:].tolist()
    assert 50256 in free[:-1]
    stopped = boosted.generate(prompt, max_new_tokens=40, temperature=0.0, stop="<|endoftext|>")
    assert stopped.tokens[0, 2 : stopped.lengths[0]].tolist() == free[: free.index(50256) + 1]
    assert stopped.texts[0].endswith("<|endoftext|>")


def test_a_generation_reports_its_completions_and_speed(char_bundle):
    options = dict(max_new_tokens=30, temperature=1.0, seed=2)
    stop = char_bundle.generate(["ROMEO:"], **options).completions()[0][10:12]
    result = char_bundle.generate(["ROMEO:", "KING:"], stop=stop, **options)
    decode = char_bundle.tokenizer.decode
    for i in range(2):
        new = result.tokens[i, result.prompt_lengths[i] : result.lengths[i]].tolist()
        assert result.completions()[i] == decode(new)
        assert result.texts[i] == result.prompts[i] + result.completions()[i]
    counted = sum(len(char_bundle.tokenizer.encode(c)) for c in result.completions())
    assert result.new_token_count == counted == int(np.sum(result.lengths - result.prompt_lengths))
    assert result.new_token_count < 60  # a stop cut a row short, and the count knows it
    assert result.generate_seconds > 0
    assert result.tokens_per_second == pytest.approx(
        result.new_token_count / result.generate_seconds
    )


def test_stop_token_ids_end_rows_on_the_device(gpt2_bundle):
    bundle, _ = gpt2_bundle
    free = bundle.generate([[464, 3290]], max_new_tokens=30, temperature=0.0)
    first_new = int(free.tokens[0, 2])
    stopped = bundle.generate([[464, 3290]], max_new_tokens=30, temperature=0.0, stop=[first_new])
    assert stopped.lengths[0] == 3 and stopped.tokens[0, 2] == first_new


def test_padded_vocabulary_is_never_drawn(shakespeare_chars):
    config = GPTConfig(block_size=32, vocab_size=96, n_layer=1, n_head=2, n_embd=16)
    params = jax.tree.map(np.array, params_of(GPT(config, rngs=nnx.Rngs(0))))
    params["wte"]["embedding"][65:] *= 1000.0  # padded rows would win every draw
    bundle = make_bundle(config, CharTokenizer(shakespeare_chars), params)
    result = bundle.generate(["a"] * 4, max_new_tokens=20, temperature=2.0)
    assert result.tokens.max() < 65
    assert np.asarray(bundle.logits([[0]]))[0, -1].argmax() >= 65  # it really was tempted


def test_nan_logits_are_an_error(shakespeare_chars):
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16)
    params = jax.tree.map(np.array, params_of(GPT(config, rngs=nnx.Rngs(0))))
    params["ln_f"]["scale"][:] = np.nan
    bundle = make_bundle(config, CharTokenizer(shakespeare_chars), params)
    with pytest.raises(UserError, match="NaN"):
        bundle.generate(["a"], max_new_tokens=5)


def test_infinite_logits_are_an_error(shakespeare_chars):
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16)
    params = jax.tree.map(np.array, params_of(GPT(config, rngs=nnx.Rngs(0))))
    params["ln_f"]["scale"][:] = 0.0
    params["ln_f"]["bias"][:] = 1e30  # every row's final features: 1e30
    params["wte"]["embedding"][:] = np.abs(params["wte"]["embedding"]) + 1e10  # logits: +inf
    bundle = make_bundle(config, CharTokenizer(shakespeare_chars), params)
    assert np.all(np.isposinf(np.asarray(bundle.logits([[1, 2]]))))
    with pytest.raises(UserError, match="infinite"):
        bundle.generate(["a"], max_new_tokens=5)


def test_one_bad_row_among_good_ones_is_an_error(shakespeare_chars):
    config = GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16)
    params = jax.tree.map(np.array, params_of(GPT(config, rngs=nnx.Rngs(0))))
    params["wpe"]["embedding"][9] = np.nan  # only a context reaching position 9 sees it
    bundle = make_bundle(config, CharTokenizer(shakespeare_chars), params)
    good = ["ab", "cd", "ef"]
    assert bundle.generate(good, max_new_tokens=4, temperature=0.0).lengths.tolist() == [6] * 3
    with pytest.raises(UserError, match="NaN"):
        bundle.generate([*good, "a longer one"], max_new_tokens=4, temperature=0.0)


def test_prompt_validation(char_bundle, gpt2_bundle):
    with pytest.raises(UserError, match="outside"):
        char_bundle.generate(["ROMEO: ©"], max_new_tokens=5)
    with pytest.raises(UserError, match="empty prompt"):
        char_bundle.generate([""], max_new_tokens=5)
    with pytest.raises(UserError, match="max_new_tokens"):
        char_bundle.generate(["a"], max_new_tokens=0)
    with pytest.raises(UserError, match="temperature"):
        char_bundle.generate(["a"], temperature=-1.0)
    bundle, _ = gpt2_bundle
    with pytest.warns(UserWarning, match="block_size"):
        long = bundle.generate([list(range(100, 200))], max_new_tokens=3, temperature=0.0)
    assert long.lengths[0] == 103 and long.tokens[0, :100].tolist() == list(range(100, 200))


def test_non_ascii_prompt_round_trips(gpt2_bundle):
    bundle, _ = gpt2_bundle
    result = bundle.generate("你好,我叫", max_new_tokens=5, temperature=0.0)
    assert result.texts[0].startswith("你好,我叫")


def test_streaming_matches_one_shot(char_bundle):
    pieces = []
    streamed = char_bundle.generate(
        ["ROMEO:"], max_new_tokens=40, seed=11, on_text=lambda row, text: pieces.append(text)
    )
    one_shot = char_bundle.generate(["ROMEO:"], max_new_tokens=40, seed=11)
    assert streamed.texts == one_shot.texts
    assert "ROMEO:" + "".join(pieces) == one_shot.texts[0]
    assert len(pieces) > 1


def test_a_bfloat16_decode_holds_no_float32_copy_of_the_tables(gpt2_checkpoint):
    """Left free, XLA:CPU converts a bfloat16 model's whole embedding tables to float32 for the
    sum of a token's two rows, once per decode call (gpt2: 154 MB written): the model looks the
    rows up as their bits, so the decode program holds no float32 copy of either table."""
    low = nanogpt_jax.load(gpt2_checkpoint[0], dtype="bfloat16")
    low.generate(["hello"], max_new_tokens=8, seed=0)
    C = low.config.n_embd
    tables = [f"[{low.config.vocab_size},{C}]", f"[{low.config.block_size},{C}]"]
    programs = [program for key, program in low.engine.programs.items() if key[0] == "decode"]
    assert programs
    for program in programs:
        text = program.as_text()
        for table in tables:
            assert f"bf16{table}" in text and f"f32{table}" not in text, table


def test_bfloat16_compute_stays_close(gpt2_bundle, gpt2_checkpoint):
    bundle, _ = gpt2_bundle
    low = nanogpt_jax.load(gpt2_checkpoint[0], dtype="bfloat16")
    # the matrices are stored in bfloat16 (half the bytes read per token); LayerNorms and
    # biases stay float32
    stored = {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf.dtype
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(low.params))
    }
    for name, dtype in stored.items():
        is_matrix = name.endswith(("weight", "embedding"))
        assert dtype == (jnp.bfloat16 if is_matrix else jnp.float32), (name, dtype)
    ids = np.random.default_rng(4).integers(0, 50257, (4, 24))
    a, b = np.asarray(bundle.logits(ids)), np.asarray(low.logits(ids))
    assert b.dtype == np.float32
    error = relative_logit_error(b, a)
    agree = np.mean(a.argmax(-1) == b.argmax(-1))
    print(f"bfloat16 logit error: {error:.2e} of the logit scale, argmax agreement {agree:.3f}")
    assert error < 0.05  # bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert agree >= 0.9, agree  # near-ties may part


def test_a_bfloat16_models_cache_changes_no_number_in_any_dtype(gpt2_checkpoint, monkeypatch):
    """On a CPU a bfloat16 model keeps its cache as bfloat16's bits (uint16) where the
    attention kernel reads it, in float32 where XLA does (XLA:CPU converts a bfloat16 cache
    to float32 and back at every write). Keys and values are bfloat16 numbers either way, so
    every logit is the one a float32 or a bfloat16 cache gives, past block_size too."""
    low = nanogpt_jax.load(gpt2_checkpoint[0], dtype="bfloat16")
    bits = decode_attention.available()
    assert engine_of(low).cache_dtype == (jnp.uint16 if bits else jnp.float32)
    rows = [[11, 22, 33], list(range(100, 113))]
    steps = 80  # every row crosses block_size (64)
    logits, tokens = stepwise_logits(low, rows, steps)
    for dtype in (jnp.float32, jnp.bfloat16):
        other = Engine(low, cache_dtype=jnp.dtype(dtype))
        expected_logits, expected_tokens = stepwise_logits(low, rows, steps, other)
        np.testing.assert_array_equal(tokens, expected_tokens)
        for got, expected in zip(logits, expected_logits, strict=True):
            np.testing.assert_array_equal(got, expected)
    for row in tokens:
        assert distinct_new(row, 0) > 10, row
    monkeypatch.setenv("NANOGPT_JAX_KERNELS", "0")  # XLA's attention: a float32 cache
    assert Engine(low).cache_dtype == jnp.float32


def plain_product(x, w):
    """The model's products as one dot_general over x's own axes (no rows matrix, no lone
    row padded): the unoptimised path `rows_times` must agree with."""
    dims = (((x.ndim - 1,), (w.ndim - 1,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def greedy_both_ways(bundle, rows, switch, label: str) -> tuple[float, float]:
    """80 greedy steps past block_size (64), traced afresh before and after `switch()`: the
    same tokens, rows that wander; the largest logit difference and the logits' scale."""
    steps = 80  # every row crosses block_size (64)
    jax.clear_caches()
    logits, tokens = stepwise_logits(bundle, rows, steps, Engine(bundle))
    switch()
    jax.clear_caches()  # traced again, the other way
    expected_logits, expected_tokens = stepwise_logits(bundle, rows, steps, Engine(bundle))
    np.testing.assert_array_equal(tokens, expected_tokens)
    for row in tokens:
        assert distinct_new(row, 0) > 10, row
    worst = max(max_abs_diff(a, b) for a, b in zip(logits, expected_logits, strict=True))
    scale = max(float(np.abs(x).max()) for x in expected_logits)
    print(f"{label}, {len(rows)} rows: max |logit difference| {worst:.2e} of scale {scale:.1f}")
    return worst, scale


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [[[11, 22, 33]], [[11, 22, 33], list(range(100, 113))]])
def test_products_of_row_matrices_change_no_token(gpt2_checkpoint, monkeypatch, dtype, rows):
    """Every product multiplies a matrix of rows (a lone bfloat16 row padded to two on a CPU):
    greedy tokens equal those of the plain products, past block_size too; in float32 so does
    every logit, and in bfloat16 the logits differ only by summation order. (XLA's products
    only: the native kernel is tested against them below.)"""
    monkeypatch.setenv("NANOGPT_JAX_KERNELS", "0")
    bundle = nanogpt_jax.load(gpt2_checkpoint[0], dtype=dtype)
    worst, scale = greedy_both_ways(
        bundle,
        rows,
        lambda: monkeypatch.setattr(nanogpt_jax.model, "rows_times", plain_product),
        dtype,
    )
    assert worst <= (0.0 if dtype == "float32" else 1e-5 * scale)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [[[11, 22, 33]], [[11, 22, 33], list(range(100, 113))]])
def test_the_native_products_change_no_token(gpt2_checkpoint, monkeypatch, dtype, rows):
    """A decode step's products and attention in the native kernels (on by default on a CPU)
    against XLA's (NANOGPT_JAX_KERNELS=0): the same greedy tokens for 80 steps past
    block_size, logits within 1e-5 of their scale (float32 sums in another order); one row
    and two."""
    bundle = nanogpt_jax.load(gpt2_checkpoint[0], dtype=dtype)
    worst, scale = greedy_both_ways(
        bundle, rows, lambda: monkeypatch.setenv("NANOGPT_JAX_KERNELS", "0"), dtype
    )
    assert 0.0 < worst <= 1e-5 * scale  # the kernels ran, and summed in their own order


def attend_one_way(way):
    """attend_filled always reading the cache one way: "loop" over the blocks the rows
    reached (each sliced out of the cache), or "every" block in one product."""
    from nanogpt_jax.model import attend_every_block, attend_reached_blocks

    def attend(q, k, v, filled, block):
        per_row = jnp.repeat(filled, q.shape[0] // filled.shape[0]) if q.ndim == 3 else filled
        if way == "every":
            return attend_every_block(q, k, v, per_row, block)
        reached = (jnp.max(filled) + block - 1) // block
        return attend_reached_blocks(q, k, v, per_row, reached, block)

    return attend


def test_either_way_of_reading_the_cache_changes_no_logit(gpt2_checkpoint, monkeypatch):
    """A step reads its cache in a loop over the reached blocks, or, past half the cache, in
    one product over every block: forced one way or the other for a whole greedy run of 80
    steps (rows of 3 and 13 tokens, blocks of 16 slots in a 64-slot cache, past block_size),
    every logit equals the default's, bit for bit."""
    bundle = nanogpt_jax.load(gpt2_checkpoint[0])
    rows, steps = [[11, 22, 33], list(range(100, 113))], 80
    monkeypatch.setenv("NANOGPT_JAX_KERNELS", "0")  # XLA's two ways, not the native kernel
    monkeypatch.setattr(nanogpt_jax.engine, "ATTEND_BLOCK", 16)
    jax.clear_caches()
    logits, tokens = stepwise_logits(bundle, rows, steps, Engine(bundle))
    for way in ("loop", "every"):
        monkeypatch.setattr(nanogpt_jax.model, "attend_filled", attend_one_way(way))
        jax.clear_caches()  # traced again, reading the cache that way
        forced_logits, forced_tokens = stepwise_logits(bundle, rows, steps, Engine(bundle))
        np.testing.assert_array_equal(forced_tokens, tokens)
        for got, expected in zip(forced_logits, logits, strict=True):
            np.testing.assert_array_equal(got, expected)
    for row in tokens:
        assert distinct_new(row, 0) > 10, row


def test_top_k_row_by_row_changes_no_token_nor_logprob(gpt2_checkpoint, monkeypatch):
    """Sampling with top-k and log-probabilities, 64 steps past block_size: every token, log-
    probability and alternative is the same whether `top_k` (the alternatives' selection, and
    the sampling cut where the native kth_largest kernel is not built) goes row by row (the
    default on a CPU) or over the whole batch with `jax.lax.top_k`."""
    bundle = nanogpt_jax.load(gpt2_checkpoint[0])
    rows, steps = [[11, 22, 33], list(range(100, 113)), [7]], 64

    def run():
        jax.clear_caches()
        engine = Engine(bundle)
        state = start_rows(engine, rows, 10_000, num_slots=64, temperature=0.9)
        settings = SamplingParams.create(0.9, top_k=20).for_rows(len(rows))
        state = dataclasses.replace(state, sampling=settings)
        _, out = engine.decode(state, jnp.array([FILL]), steps, logprobs=5)
        return [np.asarray(x) for x in (out.tokens, out.logprobs, out.top_ids, out.top_logprobs)]

    default = run()
    monkeypatch.setattr(nanogpt_jax.sampling, "top_k", jax.lax.top_k)
    monkeypatch.setattr(nanogpt_jax.engine, "top_k", jax.lax.top_k)
    whole_batch = run()
    for got, expected in zip(default, whole_batch, strict=True):
        np.testing.assert_array_equal(got, expected)
    tokens = default[0]
    assert (tokens != FILL).all()
    for row in tokens:
        assert distinct_new(row, 0) > 10, row


def test_convert_hf_for_generation_matches_torch_reference(tmp_path):
    model = hf_gpt2(seed=9, n_positions=32)
    model.save_pretrained(tmp_path)
    converted = convert(str(tmp_path))
    bundle = make_bundle(converted.config, converted.tokenizer, converted.params)
    from nanogpt_jax.interop.torch_reference import from_params

    reference = from_params(converted.config, converted.params)
    prompt = [[5, 6, 7, 8]]
    expected = reference.generate(torch.tensor(prompt), 40, temperature=0.0)[0].tolist()
    result = bundle.generate(prompt, max_new_tokens=40, temperature=0.0)
    assert result.tokens[0].tolist() == expected
    assert distinct_new(expected, len(prompt[0])) > 10
