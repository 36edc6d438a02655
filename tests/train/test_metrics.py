"""Exact metrics against brute-force pairwise definitions, with heavy score ties."""
from __future__ import annotations

import numpy as np
import pytest

from recsys.train import metrics


def brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def brute_gauc(users, labels, scores) -> float:
    total, weight = 0.0, 0
    for u in np.unique(users):
        rows = users == u
        a = brute_auc(labels[rows], scores[rows])
        if not np.isnan(a):
            total += a * rows.sum()
            weight += rows.sum()
    return total / weight


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_gauc_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 600
    users = rng.integers(0, 40, n)
    labels = rng.integers(0, 2, n)
    # Few distinct score values: most rows tie with others of the same user.
    scores = rng.integers(0, 5, n).astype(np.float64) + labels * rng.integers(0, 2, n)
    assert metrics.auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
    value, n_users = metrics.gauc(users, labels, scores)
    assert value == pytest.approx(brute_gauc(users, labels, scores), abs=1e-12)
    both = [u for u in np.unique(users) if 0 < labels[users == u].sum() < (users == u).sum()]
    assert n_users == len(both)


def test_gauc_is_independent_of_row_order():
    rng = np.random.default_rng(7)
    users, labels, scores = rng.integers(0, 30, 500), rng.integers(0, 2, 500), rng.normal(size=500)
    perm = rng.permutation(500)
    assert metrics.gauc(users, labels, scores) == metrics.gauc(users[perm], labels[perm], scores[perm])


def test_gauc_skips_single_class_users_and_perfect_ranking_is_one():
    users = np.array([1, 1, 1, 2, 2, 3, 3])
    labels = np.array([0, 1, 1, 1, 1, 0, 1])
    scores = np.array([0.1, 0.5, 0.9, 0.3, 0.2, 0.4, 0.6])
    value, n_users = metrics.gauc(users, labels, scores)
    assert (value, n_users) == (1.0, 2)


def test_logloss_matches_definition_and_clips():
    labels = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 1.0, 0.0])
    expected = -np.mean([np.log(0.9), np.log(0.8), np.log(1 - 1e-7), np.log(1 - 1e-7)])
    assert metrics.log_loss(labels, p) == pytest.approx(expected)


def test_bucketed_gauc_equals_gauc_on_each_bucket_subset():
    rng = np.random.default_rng(3)
    n = 800
    users, labels = rng.integers(0, 25, n), rng.integers(0, 2, n)
    scores = rng.integers(0, 6, n).astype(float)
    lengths = rng.integers(0, 2_000, n)
    edges = metrics.HISTORY_LENGTH_EDGES
    buckets = metrics.bucketed_gauc(lengths, edges, users, labels, scores)
    assert [b.bucket for b in buckets] == metrics.bucket_labels(edges)
    index = np.searchsorted(np.asarray(edges), lengths, side="right") - 1
    for b, bucket in enumerate(buckets):
        rows = index == b
        assert bucket.impressions == rows.sum()
        if bucket.users:
            assert bucket.gauc == pytest.approx(brute_gauc(users[rows], labels[rows], scores[rows]), abs=1e-12)
        else:
            assert np.isnan(bucket.gauc)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.auc(np.array([0, 1]), np.array([0.5]))
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.auc(np.array([0, 2]), np.array([0.5, 0.1]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auc(np.array([0, 1]), np.array([0.5, np.nan]))


def test_evaluate_scores_report():
    rng = np.random.default_rng(0)
    n = 300
    users, labels, logits = rng.integers(0, 10, n), rng.integers(0, 2, n), rng.normal(size=n)
    report = metrics.evaluate_scores(users, labels, logits, rng.integers(0, 100, n), rng.integers(0, 50, n))
    assert report.gauc == pytest.approx(brute_gauc(users, labels, logits))
    assert report.samples == n
    assert set(report.to_dict()) >= {"gauc", "auc", "logloss", "by_history_length", "by_popularity"}
