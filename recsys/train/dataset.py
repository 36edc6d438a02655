"""Streaming training/evaluation batches over impression Parquet files.

`ImpressionStream` is an IterableDataset that reads impressions (raw ids) row group by row group
with pyarrow, maps ids to dense indices through the data folder's vocabularies, and turns each
batch into a `CTRBatch` with `FeatureBuilder.build` (point-in-time histories from the
SequenceStore, GSU on the CPU fast path), so feature building runs in the DataLoader workers.

Determinism. For a given (seed, epoch) the stream has a fixed *plan*: the row groups in a seeded
random order, each cut into batches of `batch_size` rows (a batch never spans two row groups;
rows inside a row group are shuffled with a seed derived from (seed, epoch, row group)). Global
batch i of the plan goes to worker i mod W, and the DataLoader hands batches back round-robin
over workers, so the training process sees the plan in order whatever W is. Resuming from batch
b of an epoch is therefore exact: every worker starts at its share of the plan after b.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recsys.data.vocab import Vocab
from recsys.train.split import parquet_units

COLUMNS = ["user_id", "item_id", "ts", "label"]


class BatchBuilder(Protocol):
    def build(self, users: torch.Tensor, candidates: torch.Tensor, ts: torch.Tensor, labels: torch.Tensor | None,
              id_embeddings: torch.Tensor | None = None): ...


@dataclass
class Requests:
    """Dense inputs of `FeatureBuilder.build` for B impressions (C = 1), before features.

    users [B], candidates [B, 1], ts [B], labels float32 [B, 1].
    """

    users: torch.Tensor
    candidates: torch.Tensor
    ts: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class PlannedBatch:
    """Rows [start, stop) of the (shuffled) row group `unit` of the plan."""

    unit: int
    start: int
    stop: int


class ImpressionStream(IterableDataset):
    """Yields `CTRBatch`es (one impression per row: C = 1) over Parquet impression files.

    Args:
        files: impression Parquet files (user_id, item_id, ts, label; raw ids).
        batch_size: rows per batch (the last batch of a row group holds 0.5 to 1.5 batches of rows).
        make_builder: picklable zero-argument callable returning the FeatureBuilder; called once
            per worker process (it opens the memory-mapped store and tables there).
        user_vocab, item_vocab: vocabulary files mapping raw ids to dense indices.
        shuffle: shuffle row-group order and rows within row groups (training); evaluation
            streams keep file order.
        seed: the plan's seed; epoch and start batch are set with `set_position`.
        build_in_workers: build features in the workers (default). False yields `Requests` for
            the training process to build itself: the "sim-soft" GSU reads the model's current
            item id table, which only the training process holds.
    """

    def __init__(
        self,
        files: list[Path],
        batch_size: int,
        make_builder: Callable[[], BatchBuilder],
        user_vocab: Path,
        item_vocab: Path,
        shuffle: bool,
        seed: int = 0,
        build_in_workers: bool = True,
    ):
        super().__init__()
        self.units = parquet_units([Path(f) for f in files])
        self.batch_size = batch_size
        self.make_builder = make_builder
        self.vocab_paths = (Path(user_vocab), Path(item_vocab))
        self.shuffle = shuffle
        self.seed = seed
        self.build_in_workers = build_in_workers
        self.epoch = 0
        self.start_batch = 0

    @property
    def num_rows(self) -> int:
        return sum(rows for _, _, rows in self.units)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Stream epoch `epoch` of the plan from its batch `start_batch` on."""
        self.epoch, self.start_batch = epoch, start_batch

    def _unit_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))

    def plan(self) -> list[PlannedBatch]:
        """Every batch of the current epoch, in the order the training loop receives them.

        A row group's tail shorter than half a batch joins the batch before it: tiny batches
        give noisy steps, and a single-row batch breaks batch-statistics layers (Dice).
        """
        batches = []
        for unit in self._unit_order():
            rows = self.units[unit][2]
            starts = list(range(0, rows, self.batch_size))
            if len(starts) > 1 and rows - starts[-1] < self.batch_size // 2:
                starts.pop()
            ends = starts[1:] + [rows]
            batches.extend(PlannedBatch(int(unit), s, e) for s, e in zip(starts, ends))
        return batches

    def __len__(self) -> int:
        """Batches in one epoch (from the start batch on)."""
        return max(0, len(self.plan()) - self.start_batch)

    def _read_unit(self, unit: int) -> dict[str, np.ndarray]:
        path, group, _ = self.units[unit]
        table = pq.ParquetFile(path).read_row_group(group, columns=COLUMNS)
        columns = {name: table.column(name).to_numpy() for name in COLUMNS}
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, unit]).permutation(table.num_rows)
            columns = {name: values[order] for name, values in columns.items()}
        return columns

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        builder = self.make_builder() if self.build_in_workers else None
        user_vocab, item_vocab = (Vocab.load(path) for path in self.vocab_paths)
        mine = self.plan()[self.start_batch + worker :: workers]
        cached_unit, columns = -1, {}
        for planned in mine:
            if planned.unit != cached_unit:
                cached_unit, columns = planned.unit, self._read_unit(planned.unit)
            rows = slice(planned.start, planned.stop)
            users = torch.from_numpy(user_vocab.encode(columns["user_id"][rows]))
            items = torch.from_numpy(item_vocab.encode(columns["item_id"][rows])).unsqueeze(1)
            ts = torch.from_numpy(columns["ts"][rows].astype(np.int64))
            labels = torch.from_numpy(columns["label"][rows].astype(np.float32)).unsqueeze(1)
            yield builder.build(users, items, ts, labels) if builder is not None else Requests(users, items, ts, labels)


def make_loader(stream: ImpressionStream, num_workers: int) -> DataLoader:
    """A DataLoader over a stream that already yields whole batches."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
