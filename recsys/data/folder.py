"""Finishing a data folder: vocabularies next to the contract tables, then the SequenceStore.

Every source command ends with `finalize(layout)`, so a folder it wrote is ready for the
embedding stage, training and serving. Vocabularies already in the folder are *extended*,
never rebuilt, so dense indices stay stable across runs and daily increments.

Vocabularies written (vocab/<name>.parquet):
    user_id      users of events, impressions and users.parquet
    item_id      items of items.parquet, events and impressions
    category_id  items.parquet category_id
    user_<attr>  every attribute column of users.parquet
    item_<attr>  every extra int64 attribute column of items.parquet
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.cli import UserError
from recsys.data.vocab import Vocab
from recsys.paths import DataLayout
from recsys.schema import ITEMS_SCHEMA, OPTIONAL_FIELDS, USERS_SCHEMA
from recsys.store.sequence_store import SequenceStore

log = logging.getLogger(__name__)

CORE_VOCABS = ("user_id", "item_id", "category_id")


def user_attribute_columns(layout: DataLayout) -> list[str]:
    """Attribute columns of users.parquet (all int64 codes), in file order; [] without the file."""
    if not layout.users.exists():
        return []
    return [n for n in pq.read_schema(layout.users).names if n not in USERS_SCHEMA.names]


def item_attribute_columns(layout: DataLayout) -> list[str]:
    """Extra int64 attribute columns of items.parquet (not the contract or text columns)."""
    schema = pq.read_schema(layout.items)
    fixed = set(ITEMS_SCHEMA.names) | set(OPTIONAL_FIELDS["items"])
    return [n for n in schema.names if n not in fixed]


def _distinct(paths: list[Path], column: str) -> np.ndarray:
    """Distinct values of `column` over the existing files.

    Read in record batches, de-duplicated batch by batch (Arrow's hash unique), so memory
    stays at one batch plus the distinct values even for 100M-row event files.
    """
    parts = []
    for path in paths:
        if not path.exists():
            continue
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 20, columns=[column]):
            parts.append(pc.unique(batch.column(0)))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    values = pc.unique(pa.chunked_array(parts, type=parts[0].type))
    return np.sort(values.to_numpy(zero_copy_only=False).astype(np.int64))


def build_vocabs(layout: DataLayout) -> dict[str, Vocab]:
    """Write (or extend) every vocabulary of the folder; returns them by name."""
    for required in (layout.items, layout.events):
        if not required.exists():
            raise UserError(f"{required}: missing; a data folder needs items and events tables")
    sources: dict[str, np.ndarray] = {
        "user_id": _distinct([layout.events, layout.impressions, layout.users], "user_id"),
        "item_id": _distinct([layout.items, layout.events, layout.impressions], "item_id"),
        "category_id": _distinct([layout.items], "category_id"),
    }
    for attr in user_attribute_columns(layout):
        sources[f"user_{attr}"] = _distinct([layout.users], attr)
    for attr in item_attribute_columns(layout):
        sources[f"item_{attr}"] = _distinct([layout.items], attr)
    vocabs = {}
    for name, values in sources.items():
        path = layout.vocab(name)
        if path.exists():
            old = Vocab.load(path, name)
            vocab = old.extend(values)
            changed = len(vocab) > len(old)
            if changed:
                log.info("vocab %s: %d new key(s) appended after %d", name, len(vocab) - len(old), len(old))
        else:
            vocab, changed = Vocab.from_values(values, name), True
            log.info("vocab %s: %d keys", name, len(vocab))
        if changed:
            vocab.save(path)
        vocabs[name] = vocab
    return vocabs


def load_vocabs(layout: DataLayout) -> dict[str, Vocab]:
    """Every vocabulary file in vocab/, by name (file stem)."""
    if not layout.vocab_dir.exists():
        raise UserError(f"{layout.vocab_dir}: no vocabularies; build the data folder first (muse data ...)")
    return {p.stem: Vocab.load(p) for p in sorted(layout.vocab_dir.glob("*.parquet"))}


def item_categories(layout: DataLayout, vocabs: dict[str, Vocab]) -> np.ndarray:
    """int64 [N_items + 1]: dense item -> dense category (0 for items absent from items.parquet)."""
    items = pl.read_parquet(layout.items, columns=["item_id", "category_id"])
    out = np.zeros(vocabs["item_id"].size, dtype=np.int64)
    out[vocabs["item_id"].encode(items["item_id"].to_numpy())] = vocabs["category_id"].encode(
        items["category_id"].to_numpy()
    )
    out[0] = 0
    return out


def build_store(layout: DataLayout, max_per_user: int | None = None) -> SequenceStore:
    """(Re)build store/ from events.parquet with the folder's vocabularies."""
    vocabs = load_vocabs(layout)
    missing = [n for n in CORE_VOCABS if n not in vocabs]
    if missing:
        raise UserError(f"{layout.vocab_dir}: missing vocabularies {missing}; rebuild the data folder")
    return SequenceStore.build(
        layout.events,
        layout.store_dir,
        user_vocab=vocabs["user_id"],
        item_vocab=vocabs["item_id"],
        item_categories=item_categories(layout, vocabs),
        max_per_user=max_per_user,
    )


def finalize(layout: DataLayout, max_per_user: int | None = None) -> SequenceStore:
    """Vocabularies, then the SequenceStore: the last step of every source command."""
    build_vocabs(layout)
    return build_store(layout, max_per_user)


def is_complete(layout: DataLayout) -> bool:
    """True when the contract tables, core vocabularies and store of the folder all exist."""
    needed = [layout.items, layout.events, layout.impressions, layout.store_dir / "meta.json"]
    needed += [layout.vocab(n) for n in CORE_VOCABS]
    return all(p.exists() for p in needed)
