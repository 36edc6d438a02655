"""Exact ranking metrics for CTR evaluation: AUC, logloss, GAUC and bucketed GAUC.

Every metric is computed over the whole evaluation set at once (never averaged over batches), with
ties between equal scores given their average rank, so the numbers do not depend on batch size or
on the order of rows. All functions take flat numpy arrays of one length N and are vectorised:
sorting dominates, O(N log N).

GAUC (as in the MUSE and DIN papers): AUC per user over that user's impressions, averaged with
weights = the user's impression count, over the users that have at least one positive and one
negative impression. Users with a single class carry no ranking signal and are left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Edges are lower bounds of each bucket (a value v falls in the last edge <= v).
HISTORY_LENGTH_EDGES: tuple[int, ...] = (0, 1, 10, 50, 100, 500, 1_000, 10_000, 100_000)
POPULARITY_EDGES: tuple[int, ...] = (0, 1, 10, 100, 1_000, 10_000)


def _check(labels: np.ndarray, scores: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    for array in (scores, *others):
        if np.asarray(array).reshape(-1).shape[0] != labels.shape[0]:
            raise ValueError(f"metric inputs differ in length: {labels.shape[0]} labels vs {np.asarray(array).size}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return labels.astype(np.int64), scores


def grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC of every group, with tied scores given their average rank.

    Args:
        groups: int [N] group key of each row (e.g. user id).
        labels: {0, 1} [N].
        scores: float [N] (any monotone transform of the probability).
    Returns:
        (keys [G], auc float64 [G], counts int64 [G]) for every distinct group; auc is NaN for a
        group that lacks positives or negatives.
    """
    labels, scores = _check(labels, scores, groups)
    groups = np.asarray(groups).reshape(-1)
    if groups.size == 0:
        return groups[:0], np.zeros(0), np.zeros(0, dtype=np.int64)
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order]
    n = g.shape[0]

    group_start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    group_id = np.cumsum(np.r_[True, g[1:] != g[:-1]]) - 1
    # A tie run is a maximal stretch of equal (group, score); every member gets the run's mean rank.
    new_run = np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], n]  # exclusive
    run_mean_pos = (run_start + run_end - 1) / 2.0  # 0-based global position
    rank = run_mean_pos[run_id] - group_start[group_id] + 1.0  # 1-based rank within the group

    counts = np.diff(np.r_[group_start, n])
    n_pos = np.bincount(group_id, weights=y, minlength=group_start.size)
    n_neg = counts - n_pos
    pos_rank_sum = np.bincount(group_id, weights=rank * y, minlength=group_start.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return g[group_start], auc, counts.astype(np.int64)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC over all rows (NaN if only one class is present)."""
    labels, scores = _check(labels, scores)
    return float(grouped_auc(np.zeros(labels.shape[0], dtype=np.int64), labels, scores)[1][0]) if labels.size else float("nan")


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """Impression-weighted mean of per-user AUC over users with both labels.

    Returns:
        (gauc, number of users counted); gauc is NaN when no user has both labels.
    """
    _, aucs, counts = grouped_auc(users, labels, scores)
    valid = ~np.isnan(aucs)
    if not valid.any():
        return float("nan"), 0
    return float(np.average(aucs[valid], weights=counts[valid])), int(valid.sum())


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [eps, 1 - eps]."""
    labels, p = _check(labels, probabilities)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p))) if labels.size else float("nan")


def bucket_labels(edges: tuple[int, ...]) -> list[str]:
    """Readable names of the buckets defined by lower-bound `edges`, e.g. "10-49", "1000+"."""
    names = []
    for i, low in enumerate(edges):
        high = edges[i + 1] - 1 if i + 1 < len(edges) else None
        names.append(f"{low}+" if high is None else (str(low) if high == low else f"{low}-{high}"))
    return names


@dataclass(frozen=True)
class BucketGAUC:
    """GAUC restricted to the rows of one bucket (users need both labels inside the bucket)."""

    bucket: str
    gauc: float
    users: int
    impressions: int


def bucketed_gauc(
    values: np.ndarray, edges: tuple[int, ...], users: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> list[BucketGAUC]:
    """GAUC per bucket of `values` (e.g. history length or target popularity).

    Args:
        values: int [N] the bucketed quantity of each row; edges: increasing lower bounds.
    Returns:
        one `BucketGAUC` per edge, in order (empty buckets have gauc NaN and zero counts).
    """
    labels, scores = _check(labels, scores, users, values)
    users = np.asarray(users).reshape(-1).astype(np.int64)
    bucket = np.searchsorted(np.asarray(edges), np.asarray(values).reshape(-1), side="right") - 1
    bucket = np.clip(bucket, 0, len(edges) - 1)
    # One pass over (bucket, user) groups: the combined key keeps every user's rows per bucket apart.
    key = bucket.astype(np.int64) * (int(users.max(initial=0)) + 1) + users
    keys, aucs, counts = grouped_auc(key, labels, scores)
    key_bucket = keys // (int(users.max(initial=0)) + 1)
    out = []
    for b, name in enumerate(bucket_labels(edges)):
        in_bucket = key_bucket == b
        valid = in_bucket & ~np.isnan(aucs)
        value = float(np.average(aucs[valid], weights=counts[valid])) if valid.any() else float("nan")
        out.append(BucketGAUC(name, value, int(valid.sum()), int(counts[in_bucket].sum())))
    return out


@dataclass(frozen=True)
class EvalReport:
    """All evaluation numbers of one model on one evaluation set."""

    gauc: float
    auc: float
    logloss: float
    samples: int
    gauc_users: int
    positive_rate: float
    by_history_length: list[BucketGAUC]
    by_popularity: list[BucketGAUC]

    def scalars(self) -> dict[str, float]:
        """The headline numbers, as MLflow metric names -> values."""
        return {
            "gauc": self.gauc,
            "auc": self.auc,
            "logloss": self.logloss,
            "samples": float(self.samples),
            "gauc_users": float(self.gauc_users),
            "positive_rate": self.positive_rate,
        }

    def to_dict(self) -> dict:
        def rows(buckets: list[BucketGAUC]) -> list[dict]:
            return [b.__dict__.copy() for b in buckets]

        return {**self.scalars(), "by_history_length": rows(self.by_history_length), "by_popularity": rows(self.by_popularity)}

    def table(self) -> str:
        """The report as plain-text tables: headline metrics, then GAUC per bucket."""
        lines = [
            f"{'samples':>10} {'users':>7} {'pos rate':>9} {'GAUC':>8} {'AUC':>8} {'logloss':>8}",
            f"{self.samples:>10d} {self.gauc_users:>7d} {self.positive_rate:>9.4f} {self.gauc:>8.4f} {self.auc:>8.4f} {self.logloss:>8.4f}",
        ]
        for title, buckets in (("history length", self.by_history_length), ("target popularity", self.by_popularity)):
            lines += ["", f"GAUC by {title}:", f"  {'bucket':>12} {'impressions':>12} {'users':>7} {'GAUC':>8}"]
            lines += [f"  {b.bucket:>12} {b.impressions:>12d} {b.users:>7d} {b.gauc:>8.4f}" for b in buckets if b.impressions]
        return "\n".join(lines)


def evaluate_scores(
    users: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    history_lengths: np.ndarray,
    target_popularity: np.ndarray,
) -> EvalReport:
    """Every metric of one evaluation set from model logits.

    Args:
        users: int [N]; labels: {0, 1} [N]; logits: float [N] (pre-sigmoid);
        history_lengths: int [N] behaviours before the impression; target_popularity: int [N]
        the target item's impression count in the training split.
    """
    logits = np.asarray(logits, dtype=np.float64)
    probabilities = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without overflow warnings
    g, n_users = gauc(users, labels, logits)
    labels = np.asarray(labels)
    return EvalReport(
        gauc=g,
        auc=auc(labels, logits),
        logloss=log_loss(labels, probabilities),
        samples=int(labels.size),
        gauc_users=n_users,
        positive_rate=float(labels.mean()) if labels.size else float("nan"),
        by_history_length=bucketed_gauc(history_lengths, HISTORY_LENGTH_EDGES, users, labels, logits),
        by_popularity=bucketed_gauc(target_popularity, POPULARITY_EDGES, users, labels, logits),
    )
