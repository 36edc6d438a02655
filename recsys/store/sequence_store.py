"""Per-user behaviour sequences on disk, sliced point-in-time: `SequenceStore` and `HistoryBatch`.

Layout of a store folder (CSR over dense user indices, every array a memory-mapped .npy):

    meta.json            format, counts, max_per_user, dtypes
    offsets.npy          int64 [U + 2]: user u owns rows offsets[u]:offsets[u + 1] (user 0 is empty)
    item_ids.npy         int32 [T] dense item index, per user sorted by (ts, item)
    category_ids.npy     int32 [T] dense category index of that item
    ts.npy               int64 [T] seconds
    item_categories.npy  int64 [N + 1] dense item -> dense category (row 0 = 0)

`history()` never reads more than it returns: a binary search on `ts`, run for the whole batch
at once inside each user's row range, finds the cut; then each row is one contiguous copy. Nothing is held in memory per
user, so opening a 100M-behaviour store costs a few page-table entries.

Builds stream over dense-user blocks (bounded memory: one block of rows at a time) and write
each array sequentially; the folder is replaced atomically at the end.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from recsys.atomic import replace_dir
from recsys.cli import UserError
from recsys.data.vocab import Vocab

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_VALUE_FILES = {"item_ids": np.int32, "category_ids": np.int32, "ts": np.int64}
# Every 1-D .npy header numpy writes for these dtypes fits in 128 bytes (it pads to 64).
_NPY_HEADER_BYTES = 128
DEFAULT_BLOCK_ROWS = 16_000_000

EventsInput = Union[str, os.PathLike, pl.DataFrame, pl.LazyFrame, pa.Table]
# ((dense users, dense items, ts) of the rows of dense users [u0, u1)), u0, u1
_Block = tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int, int]


@dataclass
class HistoryBatch:
    """Padded behaviour histories of a batch of B users, W columns wide.

    item_ids, category_ids, ts: LongTensor [B, W], chronological (oldest first), left-aligned,
    0 after `lengths[b]`. lengths: LongTensor [B], number of real behaviours per row.
    """

    item_ids: torch.Tensor
    category_ids: torch.Tensor
    ts: torch.Tensor
    lengths: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.item_ids.shape[0]

    @property
    def width(self) -> int:
        return self.item_ids.shape[1]

    def mask(self) -> torch.Tensor:
        """BoolTensor [B, W]: True on real behaviours."""
        return torch.arange(self.width, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def jagged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets LongTensor [B + 1], item_ids LongTensor [sum(lengths)]), rows back to back."""
        offsets = torch.zeros(self.batch_size + 1, dtype=torch.long, device=self.lengths.device)
        torch.cumsum(self.lengths, 0, out=offsets[1:])
        return offsets, self.item_ids[self.mask()]

    def recent(self, n: int) -> HistoryBatch:
        """The last n behaviours of each row, same layout, exactly n columns wide."""
        lengths = torch.clamp(self.lengths, max=n)
        start = self.lengths - lengths
        cols = torch.arange(n, device=self.lengths.device)[None, :]
        mask = cols < lengths[:, None]
        index = torch.where(mask, start[:, None] + cols, 0).clamp(max=max(self.width - 1, 0))

        def take(values: torch.Tensor) -> torch.Tensor:
            if self.width == 0:
                return torch.zeros(self.batch_size, n, dtype=values.dtype, device=values.device)
            return torch.where(mask, values.gather(1, index), 0)

        return HistoryBatch(take(self.item_ids), take(self.category_ids), take(self.ts), lengths)

    def to(self, device: torch.device | str) -> HistoryBatch:
        return HistoryBatch(
            self.item_ids.to(device), self.category_ids.to(device), self.ts.to(device), self.lengths.to(device)
        )


class SequenceStore:
    """Read side of a store folder: memory-mapped, safe to share between threads for reading."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            raise UserError(f"{self.directory}: not a SequenceStore (no meta.json); build it with `muse store build`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise UserError(f"{meta_path}: store format {self.meta.get('format')} is not {FORMAT_VERSION}; rebuild it")
        self.num_users: int = self.meta["num_users"]
        self.num_items: int = self.meta["num_items"]
        self.num_behaviours: int = self.meta["num_behaviours"]
        self.max_per_user: int | None = self.meta["max_per_user"]
        self.offsets = np.load(self.directory / "offsets.npy")
        # A zero-length file cannot be mapped; an empty store loads its empty arrays plainly.
        mode = "r" if self.num_behaviours else None
        self._items = np.load(self.directory / "item_ids.npy", mmap_mode=mode)
        self._cats = np.load(self.directory / "category_ids.npy", mmap_mode=mode)
        self._ts = np.load(self.directory / "ts.npy", mmap_mode=mode)
        self.item_categories = torch.from_numpy(np.load(self.directory / "item_categories.npy"))
        if len(self.offsets) != self.num_users + 2 or self.offsets[-1] != self.num_behaviours:
            raise UserError(f"{self.directory}: offsets.npy does not match meta.json; rebuild the store")

    @classmethod
    def open(cls, directory: str | os.PathLike) -> SequenceStore:
        return cls(directory)

    def __repr__(self) -> str:
        return (
            f"SequenceStore({str(self.directory)!r}, users={self.num_users}, items={self.num_items}, "
            f"behaviours={self.num_behaviours}, max_per_user={self.max_per_user})"
        )

    # ------------------------------------------------------------------ reads

    def _ranges(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inside = (users >= 1) & (users <= self.num_users)
        u = np.where(inside, users, 0)
        return self.offsets[u], self.offsets[u + 1]

    def lengths(self, users: torch.Tensor | np.ndarray) -> torch.Tensor:
        """LongTensor [B]: stored behaviours of each dense user (0 for unknown users)."""
        start, end = self._ranges(_as_int64(users))
        return torch.from_numpy(end - start)

    def _cut(self, start: np.ndarray, end: np.ndarray, before_ts: np.ndarray) -> np.ndarray:
        """First row in [start, end) with ts >= before_ts: a binary search run for all rows at once."""
        lo, hi = start.copy(), end.copy()
        active = lo < hi
        while active.any():
            mid = (lo + hi) >> 1
            probe = np.where(active, mid, 0)
            go_right = active & (self._ts[probe] < before_ts)
            lo = np.where(go_right, mid + 1, lo)
            hi = np.where(active & ~go_right, mid, hi)
            active = lo < hi
        return lo

    def count_before(self, users: torch.Tensor | np.ndarray, before_ts: torch.Tensor | np.ndarray) -> torch.Tensor:
        """LongTensor [B]: how many stored behaviours each user has strictly before its ts."""
        users, before_ts = _as_int64(users), _as_int64(before_ts)
        start, end = self._ranges(users)
        return torch.from_numpy(self._cut(start, end, before_ts) - start)

    def history(
        self,
        users: torch.Tensor | np.ndarray,
        before_ts: torch.Tensor | np.ndarray,
        max_len: int,
        trim: bool = False,
    ) -> HistoryBatch:
        """The most recent <= max_len behaviours of each user strictly before its ts.

        users: dense user indices [B] (0 or > num_users: empty history); before_ts: int64 [B].
        Returns a HistoryBatch max_len columns wide, or max(lengths) wide with trim=True.
        """
        users, before_ts = _as_int64(users), _as_int64(before_ts)
        if users.shape != before_ts.shape or users.ndim != 1:
            raise ValueError(f"users {users.shape} and before_ts {before_ts.shape} must be the same 1-D shape")
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        start, end = self._ranges(users)
        cut = self._cut(start, end, before_ts)
        lengths = np.minimum(cut - start, max_len)
        width = int(lengths.max(initial=0)) if trim else max_len
        begin = cut - lengths
        # Uninitialised, and only the padding zeroed: full rows are written once, not twice. Where
        # freed memory is kept (recsys.memory: scoring and training processes) np.zeros clears
        # reused memory itself: 256 users x 100,000 behaviours 137 -> 77 ms there.
        out = [np.empty((len(users), width), dtype=np.int64) for _ in range(3)]
        # Each row is one contiguous run of the store: a slice copy (memcpy plus int32 -> int64
        # widening) per row is about 3x faster than one fancy-index gather over all [B, W]
        # positions (benchmarks/store.py measures both), and reads only the pages it returns.
        for b in range(len(users)):
            s, e, n = begin[b], cut[b], lengths[b]
            if n:
                out[0][b, :n] = self._items[s:e]
                out[1][b, :n] = self._cats[s:e]
                out[2][b, :n] = self._ts[s:e]
            if n < width:
                for column in out:
                    column[b, n:] = 0
        items, cats, ts = (torch.from_numpy(a) for a in out)
        return HistoryBatch(items, cats, ts, torch.from_numpy(lengths))

    def user_rows(self, user: int) -> dict[str, np.ndarray]:
        """All stored behaviours of one dense user (read-only views): item_ids, category_ids, ts."""
        start, end = self._ranges(np.array([user], dtype=np.int64))
        s, e = int(start[0]), int(end[0])
        return {"item_ids": self._items[s:e], "category_ids": self._cats[s:e], "ts": self._ts[s:e]}

    # ------------------------------------------------------------------ writes

    @classmethod
    def build(
        cls,
        events: EventsInput,
        out_dir: str | os.PathLike,
        *,
        user_vocab: Vocab,
        item_vocab: Vocab,
        item_categories: np.ndarray,
        max_per_user: int | None = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> SequenceStore:
        """Build a store from contract events (raw user_id, item_id, ts) into `out_dir`.

        events: a Parquet path (or glob), a polars frame or an Arrow table; any order.
        item_categories: int64 [len(item_vocab) + 1], dense item -> dense category.
        max_per_user: keep only each user's most recent behaviours (None: keep all).
        block_rows: rows held in memory at once (the peak memory knob).
        Events whose user or item is not in the vocabularies are dropped (count logged), and so
        are repeated (user, item, ts) rows.
        """
        started = time.perf_counter()
        _check_categories(item_categories, item_vocab)
        frame = _as_lazy(events)
        counts = frame.group_by("user_id").agg(pl.len().alias("n")).collect()
        dense = user_vocab.encode(counts["user_id"].to_numpy())
        n = counts["n"].to_numpy().astype(np.int64)
        if (dense == 0).any():
            log.warning("store: %d event(s) of %d user(s) not in the user vocabulary are skipped",
                        int(n[dense == 0].sum()), int((dense == 0).sum()))
        per_user = np.zeros(len(user_vocab) + 1, dtype=np.int64)
        per_user[dense[dense > 0]] = n[dense > 0]

        sorted_keys = np.sort(user_vocab.keys)

        def blocks() -> Iterator[_Block]:
            for u0, u1 in _plan_blocks(per_user, block_rows):
                keys = user_vocab.keys[u0 - 1 : u1 - 1]
                lo, hi = int(keys.min()), int(keys.max())
                # The range test lets Parquet skip row groups by their statistics. It is exact when
                # no other vocabulary key lies in [lo, hi] (always so before any Vocab.extend): rows
                # of users outside the vocabulary encode to 0 and are dropped later anyway.
                wanted = pl.col("user_id").is_between(lo, hi)
                inside = np.searchsorted(sorted_keys, hi, side="right") - np.searchsorted(sorted_keys, lo)
                if inside != len(keys):
                    wanted = wanted & pl.col("user_id").is_in(pl.Series(keys))
                part = frame.filter(wanted).select("user_id", "item_id", "ts").collect()
                yield (
                    user_vocab.encode(part["user_id"].to_numpy()),
                    item_vocab.encode(part["item_id"].to_numpy()),
                    part["ts"].to_numpy().astype(np.int64, copy=False),
                ), u0, u1

        store = _write(out_dir, blocks(), len(user_vocab), item_categories, max_per_user, per_user.sum())
        log.info("store: built %s in %.1f s", store, time.perf_counter() - started)
        return store

    @classmethod
    def merge(
        cls,
        existing_dir: str | os.PathLike,
        new_events: EventsInput,
        out_dir: str | os.PathLike,
        *,
        user_vocab: Vocab,
        item_vocab: Vocab,
        item_categories: np.ndarray,
        max_per_user: int | None = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> SequenceStore:
        """Existing store + new raw events -> a store in `out_dir` (may be `existing_dir`).

        The vocabularies must extend the ones the existing store was built with (`Vocab.extend`
        keeps old indices), so its dense ids stay valid. Each user keeps its most recent
        `max_per_user` behaviours; rows repeated between old and new data are kept once.
        """
        started = time.perf_counter()
        _check_categories(item_categories, item_vocab)
        old = cls(existing_dir)
        if old.num_users > len(user_vocab) or old.num_items > len(item_vocab):
            raise UserError(
                f"{existing_dir}: store has {old.num_users} users / {old.num_items} items, more than the "
                f"vocabularies ({len(user_vocab)} / {len(item_vocab)}): they must extend the old ones"
            )
        new = _as_lazy(new_events).select("user_id", "item_id", "ts").collect()
        new_users = user_vocab.encode(new["user_id"].to_numpy())
        new_items = item_vocab.encode(new["item_id"].to_numpy())
        new_ts = new["ts"].to_numpy().astype(np.int64, copy=False)
        if (new_users == 0).any():
            log.warning("store: %d new event(s) of users not in the user vocabulary are skipped",
                        int((new_users == 0).sum()))
        order = np.argsort(new_users, kind="stable")
        new_users, new_items, new_ts = new_users[order], new_items[order], new_ts[order]
        per_user = np.bincount(new_users, minlength=len(user_vocab) + 1).astype(np.int64)
        per_user[0] = 0
        per_user[1 : old.num_users + 1] += np.diff(old.offsets)[1:]

        def blocks() -> Iterator[_Block]:
            for u0, u1 in _plan_blocks(per_user, block_rows):
                o0, o1 = min(u0, old.num_users + 1), min(u1, old.num_users + 1)
                s, e = int(old.offsets[o0]), int(old.offsets[o1])
                old_users = np.repeat(np.arange(o0, o1, dtype=np.int64), np.diff(old.offsets[o0 : o1 + 1]))
                n0, n1 = np.searchsorted(new_users, [u0, u1])
                yield (
                    np.concatenate([old_users, new_users[n0:n1]]),
                    np.concatenate([np.asarray(old._items[s:e], dtype=np.int64), new_items[n0:n1]]),
                    np.concatenate([np.asarray(old._ts[s:e]), new_ts[n0:n1]]),
                ), u0, u1

        store = _write(out_dir, blocks(), len(user_vocab), item_categories, max_per_user, per_user.sum())
        log.info("store: merged %d new event(s) into %s in %.1f s", len(new), store, time.perf_counter() - started)
        return store


# ---------------------------------------------------------------------- build internals


def _as_int64(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64)


def _check_categories(item_categories: np.ndarray, item_vocab: Vocab) -> None:
    if len(item_categories) != item_vocab.size:
        raise ValueError(
            f"item_categories has {len(item_categories)} rows, the item vocabulary needs {item_vocab.size}"
        )


def _as_lazy(events: EventsInput) -> pl.LazyFrame:
    if isinstance(events, pl.LazyFrame):
        frame = events
    elif isinstance(events, pl.DataFrame):
        frame = events.lazy()
    elif isinstance(events, pa.Table):
        frame = pl.from_arrow(events).lazy()
    else:
        path = Path(events)
        if not path.exists() and not any(ch in str(path) for ch in "*?["):
            raise UserError(f"{path}: events file not found")
        frame = pl.scan_parquet(path)
    missing = {"user_id", "item_id", "ts"} - set(frame.collect_schema().names())
    if missing:
        source = str(events) if isinstance(events, (str, os.PathLike)) else "events"
        raise UserError(f"{source}: missing column(s) {sorted(missing)}")
    return frame


def _plan_blocks(per_user: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    """Split dense users 1..U into contiguous [u0, u1) ranges of about `block_rows` rows each."""
    num_users = len(per_user) - 1
    if num_users == 0:
        return []
    cum = np.cumsum(per_user[1:])
    blocks, u0 = [], 1
    while u0 <= num_users:
        done = cum[u0 - 2] if u0 >= 2 else 0
        # Last user whose cumulative count stays within this block's budget (at least one user).
        u1 = int(np.searchsorted(cum, done + block_rows, side="right")) + 1
        u1 = min(max(u1, u0 + 1), num_users + 1)
        blocks.append((u0, u1))
        u0 = u1
    return blocks


def _sort_dedup_cap(
    users: np.ndarray, items: np.ndarray, ts: np.ndarray, max_per_user: int | None, dropped: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows by (user, ts, item), drop unknown ids and repeats, keep each user's last rows.

    Adds the number of rows dropped for each reason to `dropped`.
    """
    known = (users > 0) & (items > 0)
    if not known.all():
        dropped["unknown user or item"] += int((~known).sum())
        users, items, ts = users[known], items[known], ts[known]
    if len(users) > 1:
        du, dts, di = np.diff(users), np.diff(ts), np.diff(items)
        if not ((du > 0) | ((du == 0) & ((dts > 0) | ((dts == 0) & (di >= 0))))).all():
            order = np.lexsort((items, ts, users))
            users, items, ts = users[order], items[order], ts[order]
            du, dts, di = np.diff(users), np.diff(ts), np.diff(items)
        repeat = (du == 0) & (dts == 0) & (di == 0)
        if repeat.any():
            dropped["repeated (user, item, ts)"] += int(repeat.sum())
            keep = np.concatenate([[True], ~repeat])
            users, items, ts = users[keep], items[keep], ts[keep]
    if max_per_user is not None and len(users):
        # Rank of each row counted from its user's most recent row; keep ranks < max_per_user.
        boundary = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1], [True]]))
        sizes = np.diff(boundary)
        from_end = np.repeat(boundary[1:], sizes) - 1 - np.arange(len(users))
        keep = from_end < max_per_user
        if not keep.all():
            dropped[f"older than the last {max_per_user} of their user"] += int((~keep).sum())
            users, items, ts = users[keep], items[keep], ts[keep]
    return users, items, ts


class _NpyAppender:
    """Writes a 1-D .npy file whose length is known only at the end (header patched on close)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * _NPY_HEADER_BYTES)

    def append(self, values: np.ndarray) -> None:
        np.ascontiguousarray(values, dtype=self.dtype).tofile(self.file)
        self.count += len(values)

    def close(self) -> None:
        self.file.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.count,)}
        np.lib.format.write_array_header_1_0(self.file, header)
        if self.file.tell() != _NPY_HEADER_BYTES:
            raise RuntimeError(f"{self.path}: unexpected .npy header size {self.file.tell()}")
        self.file.close()


def _write(
    out_dir: str | os.PathLike,
    blocks: Iterator[_Block],
    num_users: int,
    item_categories: np.ndarray,
    max_per_user: int | None,
    expected_rows: int,
) -> SequenceStore:
    out_dir = Path(out_dir)
    item_categories = np.asarray(item_categories, dtype=np.int64)
    if item_categories.ndim != 1 or len(item_categories) == 0 or item_categories[0] != 0:
        raise ValueError("item_categories must be int64 [N + 1] with row 0 = 0")
    if len(item_categories) - 1 >= np.iinfo(np.int32).max:
        raise ValueError("more than 2^31 items: the int32 item_ids layout cannot hold them")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    files: dict[str, _NpyAppender] = {}
    try:
        files = {name: _NpyAppender(tmp / f"{name}.npy", dtype) for name, dtype in _VALUE_FILES.items()}
        lengths = np.zeros(num_users + 1, dtype=np.int64)
        dropped: dict[str, int] = defaultdict(int)
        written, last_report = 0, time.perf_counter()
        for (users, items, ts), u0, u1 in blocks:
            users, items, ts = _sort_dedup_cap(users, items, ts, max_per_user, dropped)
            lengths[u0:u1] = np.bincount(users - u0, minlength=u1 - u0)
            files["item_ids"].append(items)
            files["category_ids"].append(item_categories[items])
            files["ts"].append(ts)
            written += len(users)
            if time.perf_counter() - last_report > 5:
                log.info("store: users up to %d of %d written, %d behaviours so far (of ~%d)",
                         u1 - 1, num_users, written, expected_rows)
                last_report = time.perf_counter()
        for appender in files.values():
            appender.close()
        for reason, count in dropped.items():
            log.warning("store: %d row(s) skipped: %s", count, reason)
        offsets = np.zeros(num_users + 2, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "item_categories.npy", item_categories)
        meta = {
            "format": FORMAT_VERSION,
            "num_users": num_users,
            "num_items": len(item_categories) - 1,
            "num_categories": int(item_categories.max()),
            "num_behaviours": int(offsets[-1]),
            "max_per_user": max_per_user,
            "longest_history": int(lengths.max(initial=0)),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        for appender in files.values():
            appender.file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SequenceStore(out_dir)
