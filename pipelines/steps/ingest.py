"""ingest: validate the day's raw tables and carry the cumulative catalogue forward.

Output (a data folder without store/ or embeddings/):
    events.parquet, impressions.parquet   the day's rows, validated (recsys.schema)
    items.parquet                         the catalogue: yesterday's, with the day's new/changed items
    users.parquet                         users and attributes (carried from the start folder)
    vocab/                                yesterday's vocabularies extended with the day's keys
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl

from pipelines.config import PipelineConfig
from pipelines.errors import InputInvalid
from pipelines.stage import StageContext
from pipelines.views import link_tree
from recsys.data.folder import build_vocabs
from recsys.paths import DataLayout
from recsys.schema import ContractError, read_contract, write_contract

REQUIRED = ("events", "impressions")
OPTIONAL = ("items",)


def sources(date: dt.date, config: PipelineConfig) -> dict[str, Path]:
    """The day's raw files: events and impressions always, items.parquet when the day has one."""
    day = config.day_dir(date.isoformat())
    found = {name: day / f"{name}.parquet" for name in REQUIRED}
    found.update({name: day / f"{name}.parquet" for name in OPTIONAL if (day / f"{name}.parquet").is_file()})
    return found


def previous_layout(ctx: StageContext, stage: str) -> DataLayout:
    """Yesterday's output of `stage`, or the start folder (`data_root`) on the first day."""
    prev = ctx.previous(stage)
    return DataLayout(prev if prev is not None else ctx.config.data_root)


def run(ctx: StageContext) -> None:
    prev = previous_layout(ctx, "ingest")
    out = DataLayout(ctx.output)
    try:
        events = read_contract(ctx.source("events"), "events")
        impressions = read_contract(ctx.source("impressions"), "impressions")
        catalogue = read_contract(prev.items, "items")
        if "items" in ctx.source_paths:
            day_items = read_contract(ctx.source("items"), "items")
            catalogue = _upsert(catalogue, day_items)
            ctx.rows["items_changed"] = day_items.num_rows
    except ContractError as exc:
        raise InputInvalid(str(exc)) from None
    write_contract(events, out.events, "events")
    write_contract(impressions, out.impressions, "impressions")
    write_contract(catalogue, out.items, "items")
    if prev.users.exists():
        link_tree(prev.users, out.users)
    link_tree(prev.vocab_dir, out.vocab_dir)
    before = {p.stem: pl.scan_parquet(p).select(pl.len()).collect().item() for p in out.vocab_dir.glob("*.parquet")}
    vocabs = build_vocabs(out)
    ctx.rows.update(events=events.num_rows, impressions=impressions.num_rows, items=catalogue.num_rows)
    ctx.summary["new_keys"] = {name: len(v) - before.get(name, 0) for name, v in vocabs.items() if len(v) != before.get(name, 0)}


def _upsert(catalogue, day_items):
    """Catalogue rows replaced by the day's rows with the same item_id; new items appended."""
    old = pl.from_arrow(catalogue)
    new = pl.from_arrow(day_items)
    common = [c for c in old.columns if c in new.columns]
    kept = old.join(new.select("item_id"), on="item_id", how="anti")
    return pl.concat([kept, new.select(common)], how="diagonal_relaxed").sort("item_id").to_arrow()
