"""`Ranker`: raw ids in, click probabilities out; the one scoring path of serving and batch scoring.

Per call: raw user / item ids -> dense indices (unknown ids -> 0, scored like any cold id, never
rejected); the user's history is read from the SequenceStore once (point-in-time, strictly before
ts); the GSU selects the top-K behaviours for all candidates in one pass; the ESU (the CTR model)
scores every (user, candidate) row under `torch.inference_mode`. `score` is `score_batch` on one
row, and `FeatureBuilder` makes every row a function of (user, candidate, ts) alone, so a
candidate scored online gets the score it gets in offline batch scoring.

Stage timings: "history" is id encoding plus every SequenceStore read; "gsu" is the rest of
`FeatureBuilder.build` (the top-K selection, which dominates, plus gathering the selected
behaviours' features); "esu" is the model forward and sigmoid.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kernels import prepare_table
from recsys.cli import UserError
from recsys.data.vocab import Vocab
from recsys.features import FeatureBuilder, FeatureConfig
from recsys.memory import retain_freed_memory
from recsys.models.muse import MuseModel
from recsys.paths import DataLayout
from recsys.serving.scorer import Scores, StageTimings

log = logging.getLogger(__name__)

# ts=None means "after the whole stored history".
AFTER_ALL_HISTORY = np.iinfo(np.int64).max


class _TimedStore:
    """A SequenceStore proxy that adds the time of each read to a per-thread counter.

    Lets the Ranker split `FeatureBuilder.build` into history fetch and GSU without changing it;
    each scoring thread has its own counter, so concurrent requests do not mix their timings.
    """

    _TIMED = frozenset({"history", "count_before", "lengths"})

    def __init__(self, store):
        self._store = store
        self._local = threading.local()

    def reset(self) -> None:
        self._local.seconds = 0.0

    @property
    def seconds(self) -> float:
        return getattr(self._local, "seconds", 0.0)

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if name not in self._TIMED:
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._local.seconds = self.seconds + time.perf_counter() - start

        return timed


class Ranker:
    """Scores candidates for users with one model over one data folder.

    Args:
        model: the CTR model (put in eval mode here).
        features: FeatureBuilder over the data folder, with the feature config the model was trained with.
        user_vocab, item_vocab: raw -> dense id maps of the data folder.
        version: label reported with every score (registry version or model folder name).
        max_rows: most (user, candidate) rows scored in one forward by `score_batch`.
        max_history_cells: most history entries (users x fetched length) read at once by
            `score_batch` (100,000-long histories: 41 users per chunk at the default).
        Larger inputs are split by user, which bounds memory without changing any score.
    """

    def __init__(
        self,
        model: MuseModel,
        features: FeatureBuilder,
        user_vocab: Vocab,
        item_vocab: Vocab,
        version: str,
        max_rows: int = 8192,
        max_history_cells: int = 1 << 22,
    ):
        if max_rows < 1 or max_history_cells < 1:
            raise ValueError(f"max_rows and max_history_cells must be >= 1, got {max_rows}, {max_history_cells}")
        retain_freed_memory()  # a call's large tensors are reused by the next, not faulted in again
        self.model = model.eval()
        store = features.store._store if isinstance(features.store, _TimedStore) else features.store
        self._store = _TimedStore(store)
        self.features = FeatureBuilder(self._store, features.table, features.user_features, features.config)
        self.user_vocab = user_vocab
        self.item_vocab = item_vocab
        self._version = str(version)
        self.max_rows = max_rows
        self.max_history_cells = max_history_cells
        # The SIM-soft GSU ranks behaviours by the model's own item id embeddings.
        self._id_embeddings = model.item_id_embeddings() if features.config.gsu_policy == "sim-soft" else None

    @property
    def version(self) -> str:
        return self._version

    @property
    def feature_config(self) -> FeatureConfig:
        return self.features.config

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model_uri: str,
        data_dir: str | Path,
        tracking_uri: str | None = None,
        table_dtype: str = "float16",
        max_rows: int = 8192,
    ) -> Ranker:
        """Load a model and open the data folder it scores against.

        Args:
            model_uri: "models:/NAME@ALIAS" or "models:/NAME/VERSION" (MLflow registry), or the
                path of a saved model folder (`recsys.models.io.save_model`).
            data_dir: the data folder (vocabularies, SequenceStore, embedding table, users).
            tracking_uri: the registry (default: MLFLOW_TRACKING_URI, else the folder's runs/mlflow.db).
            table_dtype: which `embeddings/table_<dtype>` to read (the one the model was trained with).
        """
        from recsys.models.io import load_feature_config, load_model_dir

        layout = DataLayout(data_dir)
        if not layout.root.is_dir():
            raise UserError(f"{layout.root}: data folder not found")
        started = time.perf_counter()
        if model_uri.startswith("models:/"):
            from recsys.train.registry import load_registered
            from recsys.train.tracking import resolve_tracking_uri

            model, feature_config, info = load_registered(model_uri, resolve_tracking_uri(layout, tracking_uri))
            version = info["version"]
        else:
            model_dir = Path(model_uri)
            if not (model_dir / "config.json").exists():
                raise UserError(f"{model_dir}: not a saved model folder (no config.json) and not a models:/ URI")
            model = load_model_dir(model_dir)
            feature_config = load_feature_config(model_dir)
            if feature_config is None:
                raise UserError(f"{model_dir}: saved without features.json; the serving batches cannot match training")
            version = model_dir.resolve().name
        needs_table = model.spec.multimodal or feature_config.gsu_policy == "muse"
        features = FeatureBuilder.from_layout(layout, feature_config, table_dtype=table_dtype if needs_table else None)
        if needs_table and model.spec.multimodal and features.table.dim != model.config.mm_dim:
            raise UserError(
                f"{layout.embedding_table(table_dtype)}: {features.table.dim}-d embeddings, "
                f"the model {model_uri} expects mm_dim {model.config.mm_dim}"
            )
        ranker = cls(
            model,
            features,
            Vocab.load(layout.vocab("user_id")),
            Vocab.load(layout.vocab("item_id")),
            version,
            max_rows=max_rows,
        )
        ranker.warm_up()
        log.info("loaded model %s (version %s) over %s in %.1f s", model_uri, version, layout.root,
                 time.perf_counter() - started)
        return ranker

    def warm_up(self) -> None:
        """One throwaway call and the GSU's per-table copies, so the first real request does not
        pay for lazy initialisation (200,000 items: 100 ms for a first request at 100,000 x 100
        against ~9 ms later ones)."""
        self.score(0, [0])
        policy = self.features.config.gsu_policy
        if policy == "muse" and self.features.table is not None:
            prepare_table(self.features.table.weights)
        elif policy == "sim-soft":
            prepare_table(self._id_embeddings)

    # ------------------------------------------------------------------ scoring

    def score(self, user_id: int, candidate_ids: Sequence[int], ts: int | None = None) -> Scores:
        """Click probabilities of one user's candidates.

        Args:
            user_id: raw user id (unknown users are scored with an empty history).
            candidate_ids: raw item ids [C].
            ts: request time in seconds; None = after the whole stored history.
        Returns:
            Scores with probabilities float32 [C], in the order of `candidate_ids`.
        """
        candidates = np.asarray(candidate_ids, dtype=np.int64).reshape(1, -1)
        result = self.score_batch(np.array([user_id], dtype=np.int64), candidates, None if ts is None else [ts])
        return Scores(result.probabilities[0], result.timings)

    def score_batch(
        self,
        user_ids: Sequence[int] | np.ndarray,
        candidate_ids: Sequence[Sequence[int]] | np.ndarray,
        ts: Sequence[int | None] | np.ndarray | None = None,
    ) -> Scores:
        """Click probabilities of B users x C candidates each.

        Args:
            user_ids: raw user ids [B].
            candidate_ids: raw item ids [B, C] (for impressions scored one by one, C = 1).
            ts: [B] request times (None entries, or ts None: after the whole history).
        Returns:
            Scores with probabilities float32 [B, C]; timings summed over the chunks.
        """
        started = time.perf_counter()
        users_raw = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        cands_raw = np.asarray(candidate_ids, dtype=np.int64)
        b = users_raw.shape[0]
        if cands_raw.ndim != 2 or cands_raw.shape[0] != b:
            raise ValueError(f"candidate_ids must be [B={b}, C], got shape {cands_raw.shape}")
        before = self._timestamps(ts, b)
        c = cands_raw.shape[1]
        out = np.empty((b, c), dtype=np.float32)
        if b == 0 or c == 0:
            return Scores(out, StageTimings(0.0, 0.0, 0.0, (time.perf_counter() - started) * 1000.0))
        history_s = gsu_s = esu_s = 0.0
        fetched = max(1, self.feature_config.fetch_len)
        users_per_chunk = max(1, min(self.max_rows // c, self.max_history_cells // fetched))
        for lo in range(0, b, users_per_chunk):
            hi = min(b, lo + users_per_chunk)
            t0 = time.perf_counter()
            users = torch.from_numpy(self.user_vocab.encode(users_raw[lo:hi]))
            cands = torch.from_numpy(self.item_vocab.encode(cands_raw[lo:hi]))
            encode_s = time.perf_counter() - t0
            self._store.reset()
            t1 = time.perf_counter()
            with torch.inference_mode():
                batch = self.features.build(users, cands, torch.from_numpy(before[lo:hi]), id_embeddings=self._id_embeddings)
                t2 = time.perf_counter()
                probabilities = torch.sigmoid(self.model(batch).float())
            t3 = time.perf_counter()
            out[lo:hi] = probabilities.reshape(hi - lo, c).numpy()
            store_s = self._store.seconds
            history_s += encode_s + store_s
            gsu_s += (t2 - t1) - store_s
            esu_s += t3 - t2
        total_ms = (time.perf_counter() - started) * 1000.0
        return Scores(out, StageTimings(history_s * 1000.0, gsu_s * 1000.0, esu_s * 1000.0, total_ms))

    @staticmethod
    def _timestamps(ts, b: int) -> np.ndarray:
        if ts is None:
            return np.full(b, AFTER_ALL_HISTORY, dtype=np.int64)
        values = [AFTER_ALL_HISTORY if t is None else int(t) for t in np.asarray(ts, dtype=object).reshape(-1)]
        if len(values) != b:
            raise ValueError(f"ts must have one entry per user ({b}), got {len(values)}")
        return np.asarray(values, dtype=np.int64)
