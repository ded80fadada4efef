"""The draw, tested statistically: over many keys, token frequencies match the tempered,
filtered softmax (chi-square), and filtered-out tokens never appear."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogpt_jax.errors import UserError
from nanogpt_jax.sampling import SamplingParams, check_sampling_options, sample

DRAWS = 40_000
LOGITS = np.array(
    [2.0, 1.5, 1.5, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, 1.2, 0.8, 0.1, -0.2, 2.4],
    np.float32,
)


def expected_distribution(logits, temperature=1.0, top_k=None, top_p=1.0, min_p=0.0):
    """The reference definitions, written independently of the implementation (numpy, float64)."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k is not None:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth  # ties with the k-th value are kept
    p = softmax(np.where(keep, z, -np.inf))
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        threshold = p[order][before < top_p].min()
        keep &= p >= threshold
        p = softmax(np.where(keep, z, -np.inf))
    if min_p > 0.0:
        keep &= p >= min_p * p.max()
        p = softmax(np.where(keep, z, -np.inf))
    return p


def softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


def draw_counts(logits, draws=DRAWS, seed=0, **options):
    params = SamplingParams.create(**options, vocab_size=len(logits))
    keys = jax.random.split(jax.random.key(seed), draws)
    tokens = jax.jit(sample)(
        jnp.broadcast_to(jnp.asarray(logits), (draws, len(logits))), keys, params
    )
    return np.bincount(np.asarray(tokens), minlength=len(logits))


def chi_square_critical(dof: int, p_value: float = 1e-4) -> float:
    """Upper quantile of the chi-square distribution (Wilson-Hilferty approximation)."""
    z = {1e-3: 3.090, 1e-4: 3.719}[p_value]
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_matches(counts, expected):
    """Removed tokens are never drawn; the kept ones follow `expected` (chi-square, p=1e-4)."""
    assert np.all(counts[expected == 0] == 0), "a filtered-out token was drawn"
    kept = expected > 0
    observed, wanted = counts[kept], expected[kept] * counts.sum()
    if kept.sum() == 1:
        assert observed[0] == counts.sum()
        return
    statistic = float(np.sum((observed - wanted) ** 2 / wanted))
    assert statistic < chi_square_critical(int(kept.sum()) - 1), (statistic, observed, wanted)


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


def test_top_k_keeps_ties_with_the_kth_logit():
    expected = expected_distribution(LOGITS, top_k=3)
    assert (expected > 0).sum() == 4  # 2.4, 2.0 and the two 1.5s


def test_temperature_zero_is_greedy():
    counts = draw_counts(LOGITS, draws=500, temperature=0.0, top_k=5, top_p=0.3)
    assert counts[np.argmax(LOGITS)] == 500


def test_top_p_always_keeps_the_most_likely_token():
    peaked = np.array([10.0, 0.0, 0.0, 0.0], np.float32)
    counts = draw_counts(peaked, draws=2000, top_p=0.01)
    assert counts[0] == 2000


def test_large_vocabulary_and_candidate_bucket():
    logits = np.random.default_rng(0).normal(0, 2, 5000).astype(np.float32)
    for options in (dict(top_k=40), dict(top_k=200, top_p=0.6), dict(top_p=0.3)):
        expected = expected_distribution(logits, **options)
        counts = draw_counts(logits, draws=10_000, **options)
        assert np.all(counts[expected == 0] == 0)
        top = np.argsort(-expected)[:5]  # the most likely tokens, where counts are large
        ratio = counts[top] / (expected[top] * counts.sum())
        assert np.all(np.abs(ratio - 1) < 0.15), ratio


def test_each_row_uses_only_its_own_key():
    params = SamplingParams.create(temperature=1.0)
    keys = jax.random.split(jax.random.key(3), 4)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (4, len(LOGITS)))
    together = np.asarray(sample(logits, keys, params))
    alone = [int(sample(logits[i : i + 1], keys[i : i + 1], params)[0]) for i in range(4)]
    assert together.tolist() == alone


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
