"""The draw, tested statistically: over many keys, token frequencies match the tempered,
filtered softmax (chi-square), and filtered-out tokens never appear."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_sampling import assert_matches, expected_distribution

import nanogpt_jax.sampling
from nanogpt_jax.errors import UserError
from nanogpt_jax.sampling import (
    DRAW_BLOCK,
    TOP_K_BY_SORT,
    SamplingParams,
    apply_top_k,
    check_sampling_options,
    first_max,
    sample,
    top_k,
)

DRAWS = 40_000
LOGITS = np.array(
    [2.0, 1.5, 1.5, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, 1.2, 0.8, 0.1, -0.2, 2.4],
    np.float32,
)


def draw_counts(logits, draws=DRAWS, seed=0, **options):
    params = SamplingParams.create(**options, vocab_size=len(logits))
    keys = jax.random.split(jax.random.key(seed), draws)
    tokens = jax.jit(sample)(
        jnp.broadcast_to(jnp.asarray(logits), (draws, len(logits))), keys, params
    )
    return np.bincount(np.asarray(tokens), minlength=len(logits))


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=1.0),
        dict(temperature=0.5),
        dict(temperature=2.0),
        dict(temperature=1.0, top_k=1),
        dict(temperature=1.0, top_k=3),  # 1.5 is tied at ranks 3 and 4: both kept
        dict(temperature=0.8, top_k=6),
        dict(temperature=1.0, top_p=0.5),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=1.3, top_p=0.75),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.7, min_p=0.3),
        dict(temperature=1.2, top_k=8, top_p=0.8, min_p=0.05),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_draw_frequencies_match_the_filtered_softmax(options):
    expected = expected_distribution(LOGITS, **options)
    assert_matches(draw_counts(LOGITS, **options), expected)


def logits_over_blocks(seed=3):
    """Logits over 4.5 blocks of the draw's CDF, with removed tokens (-inf) first, on both
    sides of every block edge, and in the whole last block."""
    V = 4 * DRAW_BLOCK + DRAW_BLOCK // 2
    logits = np.random.default_rng(seed).standard_normal(V).astype(np.float32)
    edges = [e for b in range(1, 4) for e in (b * DRAW_BLOCK - 1, b * DRAW_BLOCK)]
    logits[[0, 1, *edges]] = -np.inf
    logits[4 * DRAW_BLOCK - 1 :] = -np.inf
    return logits


def test_draws_over_many_blocks_follow_the_softmax():
    logits = logits_over_blocks()
    assert_matches(draw_counts(logits, temperature=1.0), expected_distribution(logits))


@pytest.mark.parametrize("uniform", [0.0, 1.0 - 2.0**-24, 1.0 + 2.0**-23, 0.5])
def test_a_uniform_at_either_end_draws_a_token_the_softmax_keeps(monkeypatch, uniform):
    """A uniform of 0 draws the first token of nonzero probability, the largest float32 below
    1 the last one, never a removed token beside them or at a block's edge (where the CDF's
    running sums meet). So does one past the end, as rounding can leave it past a block's own
    running sum: the last token the softmax keeps, not the likeliest. 0.5 draws the token
    where the float64 CDF crosses half."""
    logits = logits_over_blocks()
    monkeypatch.setattr(nanogpt_jax.sampling.jax.random, "uniform", lambda key: uniform)
    params = SamplingParams.create(1.0, vocab_size=len(logits))
    keys = jax.random.split(jax.random.key(0), 1)
    drawn = jax.jit(lambda x: sample(x, keys, params))(jnp.asarray(logits)[None])  # traced now
    token = int(drawn[0])
    expected = expected_distribution(logits)
    kept = np.flatnonzero(expected > 0)
    if uniform == 0.0:
        assert token == kept[0] == 2
    elif uniform > 0.5:
        assert token == kept[-1] == 4 * DRAW_BLOCK - 2 != np.argmax(logits)
    else:
        cdf = np.cumsum(expected)
        assert token == np.searchsorted(cdf, 0.5, side="right")
    assert expected[token] > 0


def test_top_k_keeps_ties_with_the_kth_logit():
    counts = draw_counts(LOGITS, draws=4000, top_k=3)
    assert sorted(np.flatnonzero(counts)) == [0, 1, 2, 15]  # 2.0, both 1.5s, 2.4


def test_greedy_breaks_ties_at_the_lowest_id():
    tied = np.array([0.5, 3.0, -1.0, 3.0, 3.0, 1.0], np.float32)
    for options in (dict(temperature=0.0), dict(temperature=0.0, top_k=2, top_p=0.5)):
        counts = draw_counts(tied, draws=50, **options)
        assert counts[1] == 50, (options, counts)


def test_first_max_is_numpys_argmax():
    """Ties (the first wins), infinities, NaN (the first NaN wins, as in numpy), all -inf, a
    lone value, and random rows of gpt2's width, jitted, inside a loop as a decode step has it."""
    nan, inf = np.nan, np.inf
    rows = [
        [0.5, 3.0, -1.0, 3.0, 3.0, 1.0],
        [-inf, -inf, -inf, -inf, -inf, -inf],
        [1.0, inf, 2.0, inf, -inf, 0.0],
        [1.0, 2.0, nan, 9.0, nan, 0.0],
        [nan, 2.0, 3.0, 3.0, 1.0, 0.0],
        [-3.0, -2.0, -2.0, -7.0, -inf, -2.5],
    ]
    cases = [np.array(rows, np.float32), np.array([[4.0]], np.float32)]
    wide = np.random.default_rng(0).standard_normal((8, 50257)).astype(np.float32)
    wide[3, [17, 40_000]] = 9.0  # a tie far apart
    cases.append(wide)
    in_a_loop = jax.jit(
        lambda x: jax.lax.fori_loop(
            0, 3, lambda i, c: first_max(x + c[0]), jnp.zeros(len(x), jnp.int32)
        )
    )
    for x in cases:
        expected = np.argmax(x, axis=-1)
        np.testing.assert_array_equal(np.asarray(jax.jit(first_max)(x)), expected)
        np.testing.assert_array_equal(np.asarray(in_a_loop(x)).astype(int), expected)
    assert np.argmax(wide[3]) == 17


def test_temperature_zero_is_greedy():
    counts = draw_counts(LOGITS, draws=500, temperature=0.0, top_k=5, top_p=0.3)
    assert counts[np.argmax(LOGITS)] == 500


def test_top_p_always_keeps_the_most_likely_token():
    # the peak sits at the last id: a draw from all -inf logits would give id 0
    peaked = np.array([0.0, 0.0, 0.0, 10.0], np.float32)
    counts = draw_counts(peaked, draws=2000, top_p=0.01)
    assert counts[3] == 2000


def test_large_vocabulary_and_candidate_bucket():
    logits = np.random.default_rng(0).normal(0, 2, 5000).astype(np.float32)
    cases = (dict(top_k=40), dict(top_k=200, top_p=0.6), dict(top_p=0.3), dict(top_k=1500))
    for options in cases:
        expected = expected_distribution(logits, **options)
        counts = draw_counts(logits, draws=10_000, **options)
        assert np.all(counts[expected == 0] == 0)
        top = np.argsort(-expected)[:5]  # the most likely tokens, where counts are large
        ratio = counts[top] / (expected[top] * counts.sum())
        assert np.all(np.abs(ratio - 1) < 0.15), ratio


def test_a_large_top_k_bucket_bisects_to_the_kth_logit_a_sort_finds():
    """Past TOP_K_BY_SORT the k-th largest logit is found by bisection: the same cut, ties,
    signed zeros and -inf included, for every k from 1 to the whole vocabulary."""
    rng = np.random.default_rng(0)
    V = 3000
    logits = rng.normal(0, 3, (8, V)).astype(np.float32)
    logits[:, :600] = np.round(logits[:, :600])  # many ties
    logits[1] = -np.abs(rng.normal(0, 3, V)) - 0.1
    logits[1, ::3], logits[1, 1::3] = 0.0, -0.0  # the largest: k=2 cuts at zero
    logits[2, :100] = -np.inf
    logits[3] = 1.0  # every logit the same
    k = np.array([1, 2, 7, 599, 600, 1777, V, 0], np.int32)  # 0: no top-k for that row
    by_sort = SamplingParams(*map(jnp.asarray, (1.0, k, 1.0, 0.0)), top_k_bucket=V)
    assert TOP_K_BY_SORT < V  # so that the same filter, with the bucket below, bisects
    by_bisection = dataclasses.replace(by_sort, top_k_bucket=TOP_K_BY_SORT + 1)
    kept_by_sort = np.asarray(jax.jit(apply_top_k)(logits, by_sort))
    kept = np.asarray(jax.jit(apply_top_k)(logits, by_bisection))
    np.testing.assert_array_equal(kept, kept_by_sort)
    assert np.isfinite(kept).sum(1)[[0, 1, 3, 7]].tolist() == [1, 2000, V, V]


def test_top_k_row_by_row_selects_what_lax_top_k_selects():
    """On a CPU `top_k` takes a batch's rows one at a time: the same values and ids as
    `jax.lax.top_k` on the whole batch, ties (lowest id first), signed zeros and -inf
    included, whatever the leading axes."""
    rng = np.random.default_rng(1)
    V = 5000
    logits = rng.normal(0, 3, (2, 3, V)).astype(np.float32)
    logits[0, 0, :900] = np.round(logits[0, 0, :900])  # many ties
    logits[0, 1, ::2], logits[0, 1, 1::2] = 0.0, -0.0
    logits[0, 2, :4000] = -np.inf
    logits[1, 0] = 1.0  # every logit the same
    for x in (logits, logits[1], logits[1, 2:]):
        for k in (1, 5, 256, 1200):
            values, ids = jax.jit(top_k, static_argnums=1)(x, k)
            expected_values, expected_ids = jax.jit(jax.lax.top_k, static_argnums=1)(x, k)
            assert values.shape == ids.shape == x.shape[:-1] + (k,)
            np.testing.assert_array_equal(np.asarray(ids), np.asarray(expected_ids))
            np.testing.assert_array_equal(np.asarray(values), np.asarray(expected_values))
            sign = np.signbit(np.asarray(values))  # 0.0 and -0.0 compare equal: the bits too
            np.testing.assert_array_equal(sign, np.signbit(np.asarray(expected_values)))


def test_each_row_uses_only_its_own_key():
    params = SamplingParams.create(temperature=1.0)
    keys = jax.random.split(jax.random.key(3), 4)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (4, len(LOGITS)))
    together = np.asarray(sample(logits, keys, params))
    alone = [int(sample(logits[i : i + 1], keys[i : i + 1], params)[0]) for i in range(4)]
    assert together.tolist() == alone


@pytest.mark.parametrize(
    "temperature, min_p",
    [
        ([0.8] * 6, [0.0] * 6),  # no row greedy, no row with min-p: both skipped on a CPU
        ([0.0, 0.8, 1.0, 0.0, 1.2, 0.9], [0.0] * 6),
        ([0.8] * 6, [0.0, 0.3, 0.0, 0.1, 0.0, 0.5]),
        ([0.0, 1.0, 0.7, 1.0, 0.0, 1.0], [0.2, 0.0, 0.0, 0.4, 0.0, 0.1]),
    ],
)
def test_work_skipped_for_settings_no_row_uses_changes_no_token(monkeypatch, temperature, min_p):
    """On a CPU `sample` picks greedy tokens only when some row is at temperature 0, and takes
    min-p's passes only when some row sets min_p: per-row settings with and without such rows
    draw the same tokens, over 20 keys, as when both are always computed."""
    B, V = 6, 300
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(B, V)) * 3, jnp.float32)
    params = SamplingParams(
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.zeros(B, jnp.int32),
        top_p=jnp.ones(B, jnp.float32),
        min_p=jnp.asarray(min_p, jnp.float32),
    )
    keys = [jax.random.split(jax.random.key(seed), B) for seed in range(20)]
    draw = jax.jit(lambda k: sample(logits, k, params))  # traced once, with only_if as it is
    skipping = [np.asarray(draw(k)) for k in keys]
    monkeypatch.setattr(nanogpt_jax.sampling, "only_if", lambda needed, change, x: change(x))
    draw = jax.jit(lambda k: sample(logits, k, params))
    always = [np.asarray(draw(k)) for k in keys]
    np.testing.assert_array_equal(np.stack(skipping), np.stack(always))
    greedy = np.asarray(temperature) == 0
    assert np.all(np.stack(skipping)[:, greedy] == np.argmax(np.asarray(logits), -1)[greedy])
    assert len({tuple(t[~greedy]) for t in skipping}) > 15  # the other rows do draw


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
    ],
)
def test_bad_options_are_refused(options, message):
    values = dict(temperature=1.0, top_k=None, top_p=1.0, min_p=0.0) | options
    with pytest.raises(UserError, match=message):
        check_sampling_options(**values)
