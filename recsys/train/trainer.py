"""The training loop: optimizers, checkpoint/resume, divergence stop, evaluation.

Dense parameters (attention, SimTier, tower) train with AdamW at `dense_lr`; embedding tables
with SparseAdam at `sparse_lr` (row-wise: only the rows a batch touches are updated, and their
moments only move then), or plain Adam when the model was built without sparse gradients.

A checkpoint is one file written atomically (temp name, then rename) holding the model and
optimizer states, the torch RNG state, the data position (epoch, next batch of the plan) and the
step counters. Resuming from it replays exactly what an uninterrupted run would have done: the
data plan is a pure function of (seed, epoch) and the training RNG is restored, so the final
weights and metrics match bit for bit (given the same number of torch threads: a different
thread count changes the order of float reductions; the number of workers does not matter).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recsys.train.dataset import ImpressionStream, make_loader
from recsys.train.metrics import EvalReport, evaluate_scores

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class TrainState:
    """Where training stands: the data position and the counters."""

    epoch: int = 0
    next_batch: int = 0
    step: int = 0
    samples: int = 0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "step": self.step, "samples": self.samples,
                "loss_curve": [list(p) for p in self.loss_curve]}

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        return cls(int(data["epoch"]), int(data["next_batch"]), int(data["step"]), int(data["samples"]),
                   [(int(s), float(v)) for s, v in data["loss_curve"]])


def build_optimizers(model: nn.Module, dense_lr: float, sparse_lr: float, weight_decay: float) -> list[torch.optim.Optimizer]:
    """AdamW over `model.dense_parameters()`, SparseAdam (or Adam) over `model.sparse_parameters()`."""
    dense = [p for p in model.dense_parameters() if p.requires_grad]
    sparse = [p for p in model.sparse_parameters() if p.requires_grad]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(dense, lr=dense_lr, weight_decay=weight_decay)]
    if sparse:
        sparse_grad = getattr(getattr(model, "config", None), "sparse_grad", False)
        optimizers.append(torch.optim.SparseAdam(sparse, lr=sparse_lr) if sparse_grad else torch.optim.Adam(sparse, lr=sparse_lr))
    return optimizers


class Trainer:
    """Runs epochs over an `ImpressionStream`, stepping every optimizer once per batch.

    Args:
        model: a module with `forward(batch) -> logits [R]`, `loss(logits, labels)`,
            `dense_parameters()` and `sparse_parameters()` (see `MuseModel`).
        stream: the training stream (its plan is replayed from `state` on resume).
        epochs, max_steps: stop after `epochs` epochs or `max_steps` steps (0 = no step limit).
        checkpoint_path, checkpoint_every: where and how often (steps; 0 = end of each epoch) to
            write a resumable checkpoint; None = never.
        on_log: called with (step, mean loss since the last call, samples/s) every `log_every` steps.
        prepare: turns what the stream yields into a CTRBatch in the training process (for
            streams that yield `Requests`); None when the stream yields CTRBatches.
    """

    def __init__(
        self,
        model: nn.Module,
        stream: ImpressionStream,
        *,
        dense_lr: float,
        sparse_lr: float,
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
        epochs: int = 1,
        max_steps: int = 0,
        num_workers: int = 0,
        checkpoint_path: Path | None = None,
        checkpoint_every: int = 0,
        log_every: int = 20,
        on_log: Callable[[int, float, float], None] | None = None,
        progress: bool = True,
        prepare: Callable | None = None,
    ):
        self.model = model
        self.prepare = prepare
        self.stream = stream
        self.optimizers = build_optimizers(model, dense_lr, sparse_lr, weight_decay)
        self.grad_clip = grad_clip
        self.epochs = epochs
        self.max_steps = max_steps
        self.num_workers = num_workers
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.on_log = on_log
        self.progress = progress
        self.state = TrainState()
        self.extra: dict = {}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Path | None = None) -> Path:
        """Write model + optimizers + RNG + data position to one file, atomically."""
        path = Path(path or self.checkpoint_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "torch_rng": torch.get_rng_state(),
            "state": self.state.to_dict(),
            "extra": self.extra,
        }
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote (no arbitrary unpickling: weights_only)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {payload.get('format')} is not {CHECKPOINT_FORMAT}")
        self.model.load_state_dict(payload["model"])
        if len(payload["optimizers"]) != len(self.optimizers):
            raise ValueError(f"{path}: checkpoint has {len(payload['optimizers'])} optimizers, the trainer {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, payload["optimizers"]):
            opt.load_state_dict(state)
        torch.set_rng_state(payload["torch_rng"])
        self.state = TrainState.from_dict(payload["state"])
        self.extra = dict(payload.get("extra", {}))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step, self.state.epoch, self.state.next_batch)

    # ------------------------------------------------------------------ loop
    def _done(self) -> bool:
        return bool(self.max_steps) and self.state.step >= self.max_steps

    def _step(self, batch) -> float:
        self.model.train()
        logits = self.model(batch)
        loss = self.model.loss(logits, batch.labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"training loss is {value} at step {self.state.step + 1} (epoch {self.state.epoch}, "
                f"batch {self.state.next_batch}); lower dense_lr/sparse_lr or set grad_clip"
            )
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.dense_parameters(), self.grad_clip)
        for opt in self.optimizers:
            opt.step()
        return value

    def fit(self) -> TrainState:
        """Train until `epochs` (or `max_steps`) are done; returns the final state."""
        window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
        while self.state.epoch < self.epochs and not self._done():
            self.stream.set_position(self.state.epoch, self.state.next_batch)
            total = len(self.stream)
            bar = tqdm(total=total, desc=f"epoch {self.state.epoch + 1}/{self.epochs}", unit="batch",
                       disable=not self.progress, dynamic_ncols=True, leave=False)
            for batch in make_loader(self.stream, self.num_workers):
                if self.prepare is not None:
                    batch = self.prepare(batch)
                loss = self._step(batch)
                rows = int(batch.labels.shape[0])
                self.state.step += 1
                self.state.next_batch += 1
                self.state.samples += rows
                window_loss, window_steps, window_samples = window_loss + loss, window_steps + 1, window_samples + rows
                if window_steps == self.log_every:
                    rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                    mean = window_loss / window_steps
                    self.state.loss_curve.append((self.state.step, mean))
                    bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:,.0f}")
                    if self.on_log:
                        self.on_log(self.state.step, mean, rate)
                    window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                bar.update(1)
                if self.checkpoint_path and self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                if self._done():
                    break
            bar.close()
            if not self._done():
                self.state.epoch += 1
                self.state.next_batch = 0
            if self.checkpoint_path:
                self.save_checkpoint()
        return self.state


@torch.no_grad()
def predict_stream(
    model: nn.Module, stream: ImpressionStream, num_workers: int = 0, progress: bool = False, prepare: Callable | None = None
) -> dict[str, np.ndarray]:
    """Score every row of a stream: users, labels, logits, history_lengths, target_items (all [N])."""
    model.eval()
    stream.set_position(0, 0)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("users", "labels", "logits", "history_lengths", "target_items")}
    for batch in tqdm(make_loader(stream, num_workers), total=len(stream), desc="evaluating", unit="batch",
                      disable=not progress, leave=False, dynamic_ncols=True):
        if prepare is not None:
            batch = prepare(batch)
        out["logits"].append(model(batch).float().numpy())
        out["users"].append(batch.user_ids.numpy())
        out["labels"].append(batch.labels.numpy().astype(np.int64))
        out["history_lengths"].append(batch.history_lengths.numpy())
        out["target_items"].append(batch.target_items.numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def evaluate_model(
    model: nn.Module,
    stream: ImpressionStream,
    item_popularity: np.ndarray,
    num_workers: int = 0,
    progress: bool = False,
    prepare: Callable | None = None,
) -> EvalReport:
    """Exact metrics of `model` over the whole stream.

    item_popularity: int64 [item rows] training impressions per dense item (ids beyond it count 0).
    """
    scored = predict_stream(model, stream, num_workers, progress, prepare)
    items = scored["target_items"].astype(np.int64)
    popularity = np.where(items < len(item_popularity), item_popularity[np.minimum(items, len(item_popularity) - 1)], 0)
    return evaluate_scores(scored["users"], scored["labels"], scored["logits"], scored["history_lengths"], popularity)
