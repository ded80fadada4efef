"""nanoGPT's and Hugging Face's sampling definitions, written independently of the package
(numpy, float64), and the chi-square check that draws follow them."""

import math

import numpy as np


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


def chi_square_critical(dof: int, p_value: float = 1e-4) -> float:
    """Upper quantile of the chi-square distribution (Wilson-Hilferty approximation)."""
    z = {1e-3: 3.090, 1e-4: 3.719}[p_value]
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_matches(counts, expected):
    """Removed tokens are never drawn; the kept ones follow `expected` (chi-square, p=1e-4).
    Tokens expected fewer than 5 times are pooled into one cell, as the test requires."""
    counts = np.asarray(counts)
    assert np.all(counts[expected == 0] == 0), "a filtered-out token was drawn"
    kept = expected > 0
    observed, wanted = counts[kept], expected[kept] * counts.sum()
    if kept.sum() == 1:
        assert observed[0] == counts.sum()
        return
    rare = wanted < 5
    if rare.any():
        observed = np.append(observed[~rare], observed[rare].sum())
        wanted = np.append(wanted[~rare], wanted[rare].sum())
    assert len(wanted) > 1, "every kept token is rare: draw more"
    statistic = float(np.sum((observed - wanted) ** 2 / wanted))
    assert statistic < chi_square_critical(len(wanted) - 1), (statistic, observed, wanted)
