"""SequenceStore: CSR layout, point-in-time histories, caps, merges; HistoryBatch helpers."""
import json
import logging

import numpy as np
import polars as pl
import pytest
import torch

from recsys.cli import UserError
from recsys.data.vocab import Vocab
from recsys.store import HistoryBatch, SequenceStore


def _random_events(seed=0, users=30, items=50, rows=2000, ts_range=300):
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "user_id": rng.integers(0, users, rows) * 1000 - 7000,  # raw ids: negative and sparse
            "item_id": rng.integers(0, items, rows) * 13 + 5,
            "ts": rng.integers(0, ts_range, rows),  # many ties on purpose
        }
    )


def _vocabs(events, extra_users=()):
    users = Vocab.from_values(np.concatenate([events["user_id"].to_numpy(), np.asarray(extra_users, np.int64)]))
    items = Vocab.from_values(events["item_id"].to_numpy())
    cats = np.concatenate([[0], np.arange(len(items)) % 4 + 1]).astype(np.int64)
    return users, items, cats


def _reference(events, users_vocab, items_vocab, cats, user, before, max_len, cap=None):
    """Brute force: rows of `user`, sorted by (ts, item), distinct, capped, strictly before ts."""
    frame = events.with_columns(
        pl.Series("u", users_vocab.encode(events["user_id"].to_numpy())),
        pl.Series("i", items_vocab.encode(events["item_id"].to_numpy())),
    ).filter(pl.col("u") == user).unique(["i", "ts"]).sort(["ts", "i"])
    if cap is not None:
        frame = frame.tail(cap)
    frame = frame.filter(pl.col("ts") < before).tail(max_len)
    items = frame["i"].to_numpy()
    return items, cats[items], frame["ts"].to_numpy()


def _build(tmp_path, events, name="store", **kwargs):
    users, items, cats = _vocabs(events)
    store = SequenceStore.build(events, tmp_path / name, user_vocab=users, item_vocab=items, item_categories=cats, **kwargs)
    return store, users, items, cats


def test_point_in_time_matches_brute_force(tmp_path):
    events = _random_events()
    store, users, items, cats = _build(tmp_path, events, block_rows=300)
    rng = np.random.default_rng(1)
    query_users = rng.integers(0, len(users) + 3, 64)
    before = rng.integers(-5, 320, 64)
    batch = store.history(torch.from_numpy(query_users), torch.from_numpy(before), max_len=20)
    assert batch.item_ids.shape == (64, 20) and batch.item_ids.dtype == torch.long
    for b, (u, t) in enumerate(zip(query_users, before)):
        ref_items, ref_cats, ref_ts = _reference(events, users, items, cats, u, t, 20)
        n = len(ref_items)
        assert batch.lengths[b] == n
        assert batch.item_ids[b, :n].tolist() == ref_items.tolist()
        assert batch.category_ids[b, :n].tolist() == ref_cats.tolist()
        assert batch.ts[b, :n].tolist() == ref_ts.tolist()
        assert not batch.item_ids[b, n:].any() and not batch.category_ids[b, n:].any() and not batch.ts[b, n:].any()


def test_no_behaviour_at_or_after_ts_is_ever_returned(tmp_path):
    events = _random_events(seed=3, ts_range=40)
    store, users, *_ = _build(tmp_path, events)
    all_users = np.repeat(np.arange(1, len(users) + 1), 41)
    cuts = np.tile(np.arange(41), len(users))
    batch = store.history(all_users, cuts, max_len=500)
    valid = batch.mask()
    assert (batch.ts[valid] < torch.from_numpy(cuts)[:, None].expand_as(batch.ts)[valid]).all()
    assert torch.equal(batch.lengths, store.count_before(all_users, cuts))
    # Ties: the cut at a behaviour's own ts excludes it.
    full = store.history(all_users, np.full_like(cuts, 10**9), max_len=500)
    assert torch.equal(full.lengths, store.lengths(all_users))


def test_unknown_users_get_empty_histories(tmp_path):
    store, users, *_ = _build(tmp_path, _random_events())
    batch = store.history(np.array([0, len(users) + 1, -3, 10**9]), np.full(4, 10**9), max_len=5)
    assert batch.lengths.tolist() == [0, 0, 0, 0]
    assert not batch.item_ids.any() and not batch.category_ids.any() and not batch.ts.any()


def test_trim_and_zero_max_len(tmp_path):
    store, *_ = _build(tmp_path, _random_events())
    trimmed = store.history(np.array([1, 2]), np.array([50, 100]), max_len=10_000, trim=True)
    assert trimmed.width == int(trimmed.lengths.max())
    empty = store.history(np.array([1]), np.array([100]), max_len=0)
    assert empty.item_ids.shape == (1, 0) and empty.lengths.tolist() == [0]


def test_inputs_path_arrow_and_frame_agree_and_blocks_do_not_matter(tmp_path):
    events = _random_events(seed=5)
    path = tmp_path / "events.parquet"
    events.write_parquet(path, row_group_size=100)
    users, items, cats = _vocabs(events)
    kw = dict(user_vocab=users, item_vocab=items, item_categories=cats)
    a = SequenceStore.build(path, tmp_path / "a", block_rows=97, **kw)
    b = SequenceStore.build(events.to_arrow(), tmp_path / "b", **kw)
    c = SequenceStore.build(events.sample(fraction=1.0, shuffle=True, seed=2), tmp_path / "c", **kw)
    for name in ("offsets.npy", "item_ids.npy", "category_ids.npy", "ts.npy", "item_categories.npy"):
        ref = np.load(tmp_path / "a" / name)
        assert np.array_equal(ref, np.load(tmp_path / "b" / name)), name
        assert np.array_equal(ref, np.load(tmp_path / "c" / name)), name
    assert a.num_behaviours == len(events.unique())


def test_max_per_user_keeps_most_recent(tmp_path):
    events = _random_events(seed=7)
    store, users, items, cats = _build(tmp_path, events, max_per_user=15, block_rows=200)
    assert int(store.lengths(np.arange(1, len(users) + 1)).max()) == 15
    for u in (1, 5, len(users)):
        ref_items, _, ref_ts = _reference(events, users, items, cats, u, 10**9, 100, cap=15)
        rows = store.user_rows(u)
        assert rows["item_ids"].tolist() == ref_items.tolist() and rows["ts"].tolist() == ref_ts.tolist()


def test_unknown_ids_and_repeats_are_skipped_and_counted(tmp_path, caplog):
    events = pl.DataFrame({"user_id": [1, 1, 2, 3, 2], "item_id": [10, 99, 10, 10, 10], "ts": [1, 2, 3, 4, 3]})
    users = Vocab.from_values(np.array([1, 2]))
    items = Vocab.from_values(np.array([10]))
    with caplog.at_level(logging.WARNING):
        store = SequenceStore.build(events, tmp_path / "s", user_vocab=users, item_vocab=items,
                                    item_categories=np.array([0, 1]))
    assert store.num_behaviours == 2 and store.lengths(np.array([1, 2])).tolist() == [1, 1]
    assert "1 event(s) of 1 user(s) not in the user vocabulary" in caplog.text
    assert "1 row(s) skipped: unknown user or item" in caplog.text
    assert "1 row(s) skipped: repeated (user, item, ts)" in caplog.text


def test_merge_equals_rebuild_on_all_data(tmp_path):
    events = _random_events(seed=11, rows=3000)
    old, new = events[:2000], events[2000:].vstack(events[:50])  # overlap: kept once
    new = new.with_columns(pl.when(pl.col("user_id") == -7000).then(999_000).otherwise(pl.col("user_id")).alias("user_id"))
    old_users, items, cats = _vocabs(events)
    old_users = Vocab.from_values(old["user_id"].to_numpy())
    kw = dict(item_vocab=items, item_categories=cats, max_per_user=40)
    SequenceStore.build(old, tmp_path / "store", user_vocab=old_users, **kw)
    users = old_users.extend(new["user_id"].to_numpy())
    merged = SequenceStore.merge(tmp_path / "store", new, tmp_path / "store", user_vocab=users, block_rows=500, **kw)
    rebuilt = SequenceStore.build(pl.concat([old, new]), tmp_path / "rebuilt", user_vocab=users, **kw)
    assert merged.num_users == len(users) > old_users.__len__()
    for name in ("offsets.npy", "item_ids.npy", "ts.npy", "category_ids.npy"):
        assert np.array_equal(np.load(tmp_path / "store" / name), np.load(tmp_path / "rebuilt" / name)), name
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_merge_refuses_a_smaller_vocabulary(tmp_path):
    events = _random_events()
    store, users, items, cats = _build(tmp_path, events)
    small = Vocab(users.keys[:3])
    with pytest.raises(UserError, match="must extend the old ones"):
        SequenceStore.merge(store.directory, events, tmp_path / "x", user_vocab=small, item_vocab=items, item_categories=cats)


def test_empty_store(tmp_path):
    events = pl.DataFrame({"user_id": [], "item_id": [], "ts": []}, schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Int64})
    store = SequenceStore.build(events, tmp_path / "s", user_vocab=Vocab.from_values(np.array([4])),
                                item_vocab=Vocab.from_values(np.array([1])), item_categories=np.array([0, 1]))
    batch = store.history(np.array([1, 0]), np.array([5, 5]), max_len=3)
    assert batch.lengths.tolist() == [0, 0] and batch.item_ids.shape == (2, 3)


def test_files_are_memory_mapped_npy_with_meta(tmp_path):
    store, users, items, _ = _build(tmp_path, _random_events())
    assert isinstance(store._items, np.memmap)
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["num_users"] == len(users) and meta["num_items"] == len(items)
    assert store.item_categories.shape == (items.size,) and store.item_categories.dtype == torch.long
    reopened = SequenceStore.open(tmp_path / "store")
    assert np.array_equal(reopened.offsets, store.offsets)


def test_bad_inputs(tmp_path):
    users, items = Vocab.from_values(np.array([1])), Vocab.from_values(np.array([1]))
    with pytest.raises(UserError, match="events file not found"):
        SequenceStore.build(tmp_path / "nope.parquet", tmp_path / "s", user_vocab=users, item_vocab=items, item_categories=np.array([0, 1]))
    with pytest.raises(UserError, match=r"missing column\(s\) \['ts'\]"):
        SequenceStore.build(pl.DataFrame({"user_id": [1], "item_id": [1]}), tmp_path / "s", user_vocab=users,
                            item_vocab=items, item_categories=np.array([0, 1]))
    with pytest.raises(ValueError, match="item vocabulary needs 2"):
        SequenceStore.build(pl.DataFrame({"user_id": [1], "item_id": [1], "ts": [1]}), tmp_path / "s", user_vocab=users,
                            item_vocab=items, item_categories=np.array([0]))
    with pytest.raises(UserError, match="not a SequenceStore"):
        SequenceStore.open(tmp_path)


def _batch():
    items = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]])
    lengths = torch.tensor([3, 1, 0])
    return HistoryBatch(items, items + 10 * (items > 0), items * 100, lengths)


def test_history_batch_jagged_and_recent():
    offsets, values = _batch().jagged()
    assert offsets.tolist() == [0, 3, 4, 4] and values.tolist() == [1, 2, 3, 4]
    recent = _batch().recent(2)
    assert recent.item_ids.tolist() == [[2, 3], [4, 0], [0, 0]]
    assert recent.category_ids.tolist() == [[12, 13], [14, 0], [0, 0]]
    assert recent.ts.tolist() == [[200, 300], [400, 0], [0, 0]]
    assert recent.lengths.tolist() == [2, 1, 0]
    wide = _batch().recent(6)
    assert wide.item_ids.shape == (3, 6) and wide.item_ids[0].tolist() == [1, 2, 3, 0, 0, 0]
