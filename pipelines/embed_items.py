"""Ray stage: item content + behaviour -> 128-d unit item embeddings.

    items.parquet ──> text / image inputs ──(Ray Data map_batches, actor pools)──> feature caches
    events.parquet ──> behaviour pairs ──> co-occurrence vectors (torch, driver)
    feature caches + co-occurrence ──> alignment projection (InfoNCE) ──> outputs:
        embeddings/items.parquet   item_id, vector list<float32> [D], content_hash (dense vocab order)
        embeddings/table_float16/, embeddings/table_int8/   EmbeddingTable, row = dense item index
        embeddings/items.faiss     FAISS index keyed by raw item id

Incremental by construction: an item's modality is re-encoded only when its input's content hash
changed (per-modality caches under embeddings/cache/); co-occurrence vectors and the projection
are retrained only when the events, the vocabulary or their config changed; when nothing changed
at all the stage returns at once and starts nothing (not even Ray). `embed_items` is what the
daily pipeline calls; `muse embed` wraps it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.cli import UserError
from recsys.data.vocab import Vocab
from recsys.embed.align import AlignmentModel, project, train_alignment
from recsys.embed.behaviour import behaviour_pairs, user_sequences
from recsys.embed.cache import FeatureCache, vector_column
from recsys.embed.config import EmbedConfig
from recsys.embed.content import ModalityInputs, combine_hashes, digest_text, file_digest, image_inputs, text_inputs
from recsys.embed.cooc import train_cooc
from recsys.embed.encoders import build_encoder, enabled_modalities, encoder_fingerprint
from recsys.embed.index import build_index, index_path, save_index
from recsys.paths import DataLayout
from recsys.schema import read_contract, write_parquet_atomic
from recsys.store.embedding_table import EmbeddingTable

log = logging.getLogger(__name__)

TABLE_DTYPES = ("float16", "int8")
_STAGE_KEY = b"stage_fingerprint"


def cache_dir(layout: DataLayout) -> Path:
    return layout.embeddings_dir / "cache"


class EncodeActor:
    """Ray Data callable class: one per actor, so the model is loaded once and reused for every batch.

    Batches are {"item_id": int64 [B], "input": object [B]} -> adds "vector" float32 [B, D], "ok" bool [B].
    """

    def __init__(self, modality: str, config: dict[str, Any], threads: int):
        torch.set_num_threads(threads)
        self.encoder = build_encoder(modality, EmbedConfig.from_dict(config))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors, ok = self.encoder.encode(list(batch["input"]))
        return {"item_id": batch["item_id"], "vector": vectors, "ok": ok}


class _RaySession:
    """Starts Ray on first use only (an up-to-date run never pays for it) and stops what it started.

    An already initialised Ray (a test fixture, a driver script) is used as is; otherwise
    `RAY_ADDRESS` selects a cluster, and without it a local Ray with `num_cpus` CPUs starts.
    """

    def __init__(self, num_cpus: int):
        self.num_cpus = num_cpus
        self.started = False

    def ensure(self) -> None:
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        address = os.environ.get("RAY_ADDRESS")
        if address:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            log.info("starting a local Ray with %d CPUs", self.num_cpus)
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
        self.started = True

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def encode_with_ray(modality: str, inputs: ModalityInputs, positions: list[int], config: EmbedConfig) -> tuple[np.ndarray, np.ndarray]:
    """Encode `inputs` at `positions` with a fixed-size Ray actor pool.

    Returns (vectors float32 [K, D], ok bool [K]) in the order of `positions`.
    """
    import ray

    ids = [inputs.item_ids[i] for i in positions]
    values = [inputs.inputs[i] for i in positions]
    batch_size = getattr(config, modality).batch_size
    actors = max(1, config.ray.actors)
    # Several blocks per actor so that the pool stays busy and the progress bar moves.
    n_blocks = max(1, min(len(ids) // batch_size + 1, 4 * actors))
    bounds = np.linspace(0, len(ids), n_blocks + 1).astype(int)
    blocks = [
        pa.table({"item_id": pa.array(ids[a:b], pa.int64()), "input": pa.array(values[a:b])})
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]
    dataset = ray.data.from_arrow(blocks).map_batches(
        EncodeActor,
        fn_constructor_kwargs={
            "modality": modality,
            "config": config.to_dict(),
            "threads": max(1, int(config.ray.cpus_per_actor)),
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=config.ray.cpus_per_actor,
    )
    by_id: dict[int, tuple[np.ndarray, bool]] = {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for item, vector, ok in zip(batch["item_id"], batch["vector"], batch["ok"]):
            by_id[int(item)] = (np.asarray(vector, dtype=np.float32), bool(ok))
    vectors = np.stack([by_id[i][0] for i in ids])
    ok = np.array([by_id[i][1] for i in ids], dtype=bool)
    return vectors, ok


def _modality_inputs(modality: str, items: pa.Table, layout: DataLayout) -> ModalityInputs:
    return text_inputs(items) if modality == "text" else image_inputs(items, layout.root)


def _dense_rows(values: np.ndarray, ok: np.ndarray, dense: np.ndarray, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter per-item rows [B, D] to dense-indexed [N+1, D] features plus a present mask [N+1]."""
    features = torch.zeros(num_rows, values.shape[1])
    present = torch.zeros(num_rows, dtype=torch.bool)
    features[torch.from_numpy(dense)] = torch.from_numpy(values)
    present[torch.from_numpy(dense)] = torch.from_numpy(ok)
    return features, present


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_state(path: Path) -> dict[str, str]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(path: Path, state: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _outputs_exist(layout: DataLayout) -> bool:
    return (
        layout.item_embeddings.exists()
        and index_path(layout).exists()
        and all((layout.embedding_table(d) / "meta.json").exists() for d in TABLE_DTYPES)
    )


def _stored_stage_fingerprint(layout: DataLayout) -> str:
    if not layout.item_embeddings.exists():
        return ""
    metadata = pq.read_schema(layout.item_embeddings).metadata or {}
    return metadata.get(_STAGE_KEY, b"").decode()


def read_items(layout: DataLayout) -> tuple[pa.Table, Vocab, np.ndarray]:
    """The validated items table, the item vocabulary and each item's dense index [B].

    Raises UserError (naming the file) on duplicated item ids or items missing from the vocabulary.
    """
    items = read_contract(layout.items, "items")
    vocab = Vocab.load(layout.vocab("item_id"))
    dense = vocab.encode(items.column("item_id").to_numpy())
    if (dense == 0).any():
        missing = items.column("item_id").to_numpy()[dense == 0]
        raise UserError(
            f"{layout.items}: {len(missing)} item id(s) are not in {layout.vocab('item_id')} "
            f"(first: {missing[:5].tolist()}); rebuild or extend the item vocabulary first"
        )
    return items, vocab, dense


def embed_items(layout: DataLayout | str | Path, config: EmbedConfig | None = None, *, force: bool = False) -> dict[str, Any]:
    """Run the stage on a data folder; returns a summary (counts of encoded / reused / missing items,
    what was trained or reused, timings, output paths).

    Args:
        layout: the data folder (items.parquet, events.parquet, vocab/item_id.parquet).
        config: encoders, training and Ray settings (defaults: text + co-occurrence, 128-d).
        force: ignore every cache and recompute everything.
    """
    started = time.perf_counter()
    layout = layout if isinstance(layout, DataLayout) else DataLayout(layout)
    run = _StageRun(layout, config or EmbedConfig(), force)
    if run.up_to_date():
        log.info("item embeddings are up to date with %s: nothing to do", layout.root)
        run.summary.update(up_to_date=True, seconds=round(time.perf_counter() - started, 3))
        run.summary["reused"] = {m: run.inputs[m].present for m in run.modalities}
        return run.summary
    features = run.encode_content()
    with _torch_threads(run.config.train_threads):
        users, seq_items = user_sequences(pq.read_table(layout.events, columns=["user_id", "item_id", "ts"]), run.vocab)
        if run.config.cooc.enabled:
            features["cooc"] = run.cooc_features(users, seq_items)
        vectors, mask = run.align(features, users, seq_items)
    run.write(vectors, mask, features)
    run.summary["seconds"] = round(time.perf_counter() - started, 3)
    log.info("item embeddings written to %s in %.1f s", layout.embeddings_dir, run.summary["seconds"])
    return run.summary


class _StageRun:
    """One run of the stage: its inputs, fingerprints, cache state and summary, step by step."""

    def __init__(self, layout: DataLayout, config: EmbedConfig, force: bool):
        self.layout, self.config, self.force = layout, config, force
        self.items, self.vocab, self.dense = read_items(layout)
        if not layout.events.exists():
            raise UserError(f"{layout.events}: the events table does not exist (needed for behaviour pairs)")
        self.modalities = enabled_modalities(config)
        if not self.modalities and not config.cooc.enabled:
            raise UserError("embedding config enables no source: turn on at least one of text, image, cooc")
        self.inputs = {m: _modality_inputs(m, self.items, layout) for m in self.modalities}
        # Fingerprint of every feature source; the alignment is valid only for the same sources.
        self.source_fps = {m: encoder_fingerprint(m, config) for m in self.modalities}
        self.events_digest = file_digest(layout.events)
        self.vocab_digest = file_digest(layout.vocab("item_id"))
        self.item_hashes = [
            combine_hashes(*(self.inputs[m].hashes[i] for m in self.modalities)) for i in range(self.items.num_rows)
        ]
        item_ids = self.items.column("item_id").to_pylist()
        self.stage_fp = digest_text(
            json.dumps(
                {
                    # Ray settings change where the work runs, not its result.
                    "config": {k: v for k, v in config.to_dict().items() if k != "ray"},
                    "encoders": self.source_fps,
                    "events": self.events_digest,
                    "vocab": self.vocab_digest,
                    "items": digest_text("\n".join(f"{i}:{h}" for i, h in zip(item_ids, self.item_hashes))),
                },
                sort_keys=True,
            )
        )
        self.cache_dir = cache_dir(layout)
        self.state = {} if force else _load_state(self.cache_dir / "state.json")
        self.summary: dict[str, Any] = {
            "items": self.items.num_rows,
            "rows": self.vocab.size,
            "dim": config.align.dim,
            "encoded": {m: 0 for m in self.modalities},
            "reused": {m: 0 for m in self.modalities},
            "cooc": "reused" if config.cooc.enabled else "disabled",
            "align": "reused",
            "up_to_date": False,
            "outputs": {
                "items": str(layout.item_embeddings),
                **{f"table_{d}": str(layout.embedding_table(d)) for d in TABLE_DTYPES},
                "index": str(index_path(layout)),
            },
        }

    def up_to_date(self) -> bool:
        return not self.force and _outputs_exist(self.layout) and _stored_stage_fingerprint(self.layout) == self.stage_fp

    def encode_content(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Encode new/changed items of each content modality on Ray; features [N+1, d_m] and present [N+1].

        The modalities' actor pools run side by side (one driver thread each), so their model
        loading overlaps.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        caches: dict[str, FeatureCache] = {}
        stale: dict[str, list[int]] = {}
        for m in self.modalities:
            data, path = self.inputs[m], self.cache_dir / f"{m}.parquet"
            caches[m] = FeatureCache(path, self.source_fps[m]) if self.force else FeatureCache.open(path, self.source_fps[m])
            stale[m] = [i for i in caches[m].stale(data.item_ids, data.hashes) if data.inputs[i] is not None]
            self.summary["encoded"][m] = len(stale[m])
            self.summary["reused"][m] = data.present - len(stale[m])
            if stale[m]:
                log.info(
                    "%s: encoding %d new or changed item(s) on %d actor(s); %d reused from the cache",
                    m, len(stale[m]), self.config.ray.actors, data.present - len(stale[m]),
                )
        work = [m for m in self.modalities if stale[m]]
        if work:
            ray_session = _RaySession(self.config.ray.num_cpus)
            ray_session.ensure()
            try:
                with ThreadPoolExecutor(max_workers=len(work)) as pool:
                    futures = {m: pool.submit(self._encode, m, stale[m]) for m in work}
                    for m, future in futures.items():
                        vectors, ok, seconds = future.result()
                        self.summary[f"{m}_encode_seconds"] = seconds
                        data = self.inputs[m]
                        caches[m].put([data.item_ids[i] for i in stale[m]], [data.hashes[i] for i in stale[m]], vectors, ok)
                        if not ok.all():
                            log.warning("%s: %d item(s) could not be decoded; they count as missing this modality", m, int((~ok).sum()))
            finally:
                ray_session.close()
        catalogue = set(self.items.column("item_id").to_pylist())
        features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m in self.modalities:
            caches[m].save(keep=catalogue)
            if caches[m].dim is None:
                log.warning("%s: no item has a usable %s input; the modality is left out", m, m)
                continue
            values, ok = caches[m].get(self.inputs[m].item_ids)
            features[m] = _dense_rows(values, ok, self.dense, self.vocab.size)
        return features

    def _encode(self, modality: str, positions: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        vectors, ok = encode_with_ray(modality, self.inputs[modality], positions, self.config)
        return vectors, ok, round(time.perf_counter() - t0, 3)

    def cooc_features(self, users: np.ndarray, seq_items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Co-occurrence vectors [N+1, d] and present [N+1], retrained only when events/vocab/config changed."""
        config = self.config
        cooc_fp = digest_text(json.dumps([self.events_digest, self.vocab_digest, vars(config.cooc), config.seed], sort_keys=True))
        path = self.cache_dir / "cooc.parquet"
        cache = FeatureCache.open(path, cooc_fp)
        raw_ids = self.vocab.keys.tolist()
        if self.state.get("cooc") == cooc_fp and cache.dim is not None:
            values, ok = cache.get(raw_ids)
        else:
            pairs = behaviour_pairs(users, seq_items, config.cooc.window)
            t0 = time.perf_counter()
            vectors, present = train_cooc(pairs, self.vocab.size, config.cooc, config.seed)
            self.summary.update(cooc="trained", cooc_seconds=round(time.perf_counter() - t0, 3))
            values, ok = vectors[1:], present[1:]
            cache = FeatureCache(path, cooc_fp)
            cache.put(raw_ids, [""] * len(raw_ids), values, ok)
            cache.save()
            self.state["cooc"] = cooc_fp
        self.source_fps["cooc"] = cooc_fp
        return _dense_rows(values, ok, np.arange(1, self.vocab.size, dtype=np.int64), self.vocab.size)

    def align(
        self, features: dict[str, tuple[torch.Tensor, torch.Tensor]], users: np.ndarray, seq_items: np.ndarray
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Train (or reuse) the projection and apply it: vectors float32 [N+1, D], mask bool [N+1, M]."""
        config = self.config
        names = list(features)
        if not names:
            raise UserError(f"{self.layout.items}: no item has any usable source (title, image or behaviour) to embed")
        feats = [features[n][0] for n in names]
        mask = torch.stack([features[n][1] for n in names], dim=1)
        align_fp = digest_text(
            json.dumps(
                [names, [f.shape[1] for f in feats], [self.source_fps[n] for n in names],
                 self.events_digest, self.vocab_digest, vars(config.align), config.seed],
                sort_keys=True,
            )
        )
        model_path = self.cache_dir / "align.pt"
        if self.state.get("align") == align_fp and model_path.exists():
            model = AlignmentModel.load(model_path)
        else:
            pairs = behaviour_pairs(users, seq_items, config.align.window)
            t0 = time.perf_counter()
            try:
                model = train_alignment(feats, mask, pairs, config.align, config.seed)
            except ValueError as exc:
                raise UserError(f"{self.layout.events}: {exc}") from None
            self.summary.update(align="trained", align_seconds=round(time.perf_counter() - t0, 3))
            model.save(model_path)
            self.state["align"] = align_fp
        return project(model, feats, mask), mask

    def write(self, vectors: np.ndarray, mask: torch.Tensor, features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Count what each item had, then write the tables, the index, items.parquet and the cache state."""
        has_any = mask.any(dim=1).numpy()
        has_any[0] = False
        in_catalogue = np.zeros(self.vocab.size, dtype=bool)
        in_catalogue[self.dense] = True
        self.summary["missing"] = {n: int((in_catalogue & ~present.numpy()).sum()) for n, (_, present) in features.items()}
        # Items that lack some source but still get a vector from the sources they have.
        self.summary["partial"] = int((in_catalogue & has_any & ~mask.all(dim=1).numpy()).sum())
        # Vocabulary rows with no source at all: zero rows, which the GSU never selects.
        self.summary["no_vector"] = int((~has_any[1:]).sum())
        if self.summary["partial"] or self.summary["no_vector"]:
            log.info(
                "%d item(s) lack some source and were embedded from the others (missing per source: %s); "
                "%d row(s) have no source at all and stay zero",
                self.summary["partial"], self.summary["missing"], self.summary["no_vector"],
            )
        content = np.full(self.vocab.size, "", dtype=object)
        content[self.dense] = self.item_hashes
        _write_outputs(self.layout, self.config, self.vocab, vectors, content[1:].tolist(), has_any, self.stage_fp)
        _save_state(self.cache_dir / "state.json", self.state)


def _write_outputs(
    layout: DataLayout,
    config: EmbedConfig,
    vocab: Vocab,
    vectors: np.ndarray,
    content_hashes: list[str],
    has_vector: np.ndarray,
    stage_fp: str,
) -> None:
    """vectors: float32 [N+1, D] in dense order (row 0 zero); content_hashes: N strings for rows 1..N."""
    for dtype in TABLE_DTYPES:
        table = EmbeddingTable.from_vectors(vectors, dtype)
        table.validate()
        table.save(layout.embedding_table(dtype))
    index = build_index(vectors[has_vector], vocab.keys[has_vector[1:]], config.index)
    save_index(index, index_path(layout))
    # Written last: its stage fingerprint is what marks the whole output set as complete.
    out = pa.table(
        {
            "item_id": pa.array(vocab.keys, pa.int64()),
            "vector": vector_column(vectors[1:]),
            "content_hash": pa.array(content_hashes, pa.string()),
        }
    ).replace_schema_metadata({_STAGE_KEY: stage_fp.encode(), b"dim": str(vectors.shape[1]).encode()})
    write_parquet_atomic(out, layout.item_embeddings)
