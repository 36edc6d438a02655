"""Positive item pairs from behaviour: items engaged close together by the same user.

Both the co-occurrence vectors and the alignment projection learn from these pairs. A pair is
(the item at position t, the item at position t + j) of one user's time-ordered events, for
1 <= j <= window, skipping pairs of an item with itself (a re-engagement says nothing about
which other items are alike).
"""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from recsys.data.vocab import Vocab


def user_sequences(events: pa.Table, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Events sorted by (user, ts) as dense item ids with their user ids.

    Returns:
        users int64 [E], items int64 [E] (dense; events on items outside `vocab` are dropped).
        Ties in ts keep the file order, so a rerun on the same file gives the same pairs.
    """
    frame = (
        pl.from_arrow(events.select(["user_id", "item_id", "ts"]))
        .with_row_index("row")
        .sort(["user_id", "ts", "row"])
    )
    items = vocab.encode(frame["item_id"].to_numpy())
    users = frame["user_id"].to_numpy()
    known = items > 0
    return users[known], items[known]


def behaviour_pairs(users: np.ndarray, items: np.ndarray, window: int) -> np.ndarray:
    """Pairs (a, b) of dense item ids within `window` steps in one user's sequence.

    Args:
        users: int64 [E], items: int64 [E], both sorted by (user, ts) as `user_sequences` gives.
    Returns:
        int64 [P, 2].
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    chunks = []
    for j in range(1, window + 1):
        if len(items) <= j:
            break
        same_user = users[j:] == users[:-j]
        different = items[j:] != items[:-j]
        keep = same_user & different
        chunks.append(np.stack([items[:-j][keep], items[j:][keep]], axis=1))
    if not chunks:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(chunks).astype(np.int64)
