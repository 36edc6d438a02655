"""A deterministic generator of lifelong behaviour data, where long histories and content matter.

No public data set has 100K-long histories, so long-sequence scale comes from here. The world:

- Items belong to latent *topics*; topics are grouped into coarser *categories*
  (`topics_per_category` topics each), so a category match (SIM-hard) is a blunter tool than a
  content match. Popularity inside a topic is a power law over a random ranking of its items.
- Each item has a `dim`-d content vector near its topic centre (topic centres share a category
  component): the stand-in for multimodal embeddings, written as a ready EmbeddingTable. Titles are
  synthetic text naming the topic and its words, so a text encoder can recover the topics.
- Each user has `interests_per_user` topics. Interest 0 is *dormant*: it shows up only in the
  oldest `dormant_fraction` of the history. Behaviours come in sessions of one interest, plus
  `noise_rate` random-topic behaviours.
- An impression's click probability depends on how close the target's content is to *any* of
  the user's interests, dormant one included: models that see far back (long history) and
  compare content (MUSE) can win; ID-only models struggle on rarely-seen long-tail targets.

Time: the history spans `history_days` days before `start_date`; base impressions fall in the
last 10% of that window (so point-in-time cuts matter). With `days` > 0, each following day also
gets `daily_events_per_user` behaviours and `daily_impressions_per_user` impressions per user,
returned/written as date partitions (daily/<YYYY-MM-DD>/{events,impressions}.parquet).

Everything is vectorised numpy over blocks of users with one RNG stream per block, so the data
are identical whether generated in memory (`generate`) or streamed to disk (`write`).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.cli import UserError
from recsys.data.embeddings import write_item_embeddings
from recsys.data.folder import finalize
from recsys.paths import DataLayout
from recsys.schema import atomic_path, validate_table, write_contract

log = logging.getLogger(__name__)

DAY = 86_400
USER_ID_BASE, ITEM_ID_BASE, CATEGORY_ID_BASE = 1_000_000, 5_000_000, 100
# Rows generated per block: bounds memory (about 100 bytes per behaviour while generating).
_BLOCK_ROWS = 4_000_000
_WORDS = (
    "amber harbor velvet summit cedar lantern meadow cobalt ember willow granite orchid prism "
    "falcon tundra coral maple saffron quartz canyon juniper nimbus pebble sierra thistle violet "
    "basalt citrus dune fjord glacier hazel indigo jasper kelp lotus marble nectar onyx pine "
    "raven sable topaz umber vortex wren yarrow zephyr acorn birch clover delta fern grove ivory "
    "lagoon mesa nova opal prairie quill reef sage tide vale"
).split()


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 1_000
    history_len: int = 1_000
    items: int = 50_000
    topics: int = 64
    topics_per_category: int = 4
    interests_per_user: int = 3
    dim: int = 64
    impressions_per_user: int = 20
    days: int = 0
    start_date: str = "2026-01-01"
    daily_events_per_user: int = 10
    daily_impressions_per_user: int = 10
    history_days: int = 365
    session_len: int = 8
    dormant_fraction: float = 0.3
    noise_rate: float = 0.1
    popularity_exponent: float = 1.1
    content_noise: float = 0.8
    seed: int = 0

    def check(self) -> None:
        if min(self.users, self.history_len, self.items, self.topics, self.dim, self.interests_per_user) < 1:
            raise UserError(f"synthetic: users, history_len, items, topics, dim, interests must be >= 1: {self}")
        if self.interests_per_user > self.topics:
            raise UserError(f"synthetic: {self.interests_per_user} interests per user need at least as many topics")
        if self.items < self.topics:
            raise UserError(f"synthetic: {self.items} items cannot fill {self.topics} topics")
        if self.history_len >= self.history_days * DAY:
            raise UserError(f"synthetic: {self.history_len} behaviours do not fit in {self.history_days} days of seconds")
        if self.days < 0 or min(self.impressions_per_user, self.daily_events_per_user, self.daily_impressions_per_user) < 0:
            raise UserError("synthetic: days and per-user counts must be >= 0")
        start_ts(self)

    @property
    def users_per_block(self) -> int:
        return max(1, _BLOCK_ROWS // self.history_len)


def start_ts(config: SyntheticConfig) -> int:
    """Unix seconds of `start_date` at 00:00 UTC."""
    try:
        day = dt.date.fromisoformat(config.start_date)
    except ValueError:
        raise UserError(f"synthetic: start date {config.start_date!r} is not YYYY-MM-DD") from None
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())


def day_name(config: SyntheticConfig, day: int) -> str:
    return (dt.date.fromisoformat(config.start_date) + dt.timedelta(days=day)).isoformat()


@dataclass
class World:
    """Everything drawn once: items, their content, and the users' latent interests."""

    item_topic: np.ndarray  # int64 [M]
    topic_items: np.ndarray  # int64 [M]: item indices grouped by topic, most popular first
    topic_start: np.ndarray  # int64 [T + 1]: topic t owns topic_items[topic_start[t]:topic_start[t+1]]
    item_rank: np.ndarray  # int64 [M]: popularity rank inside its topic (0 = most popular)
    centres: np.ndarray  # float32 [T, D] unit topic centres
    content: np.ndarray  # float32 [M, D] unit content vectors
    interests: np.ndarray  # int64 [U, K] topics, interests[:, 0] is the dormant one
    weights: np.ndarray  # float64 [U, K] interest weights (rows sum to 1)
    titles: list[str]


def build_world(config: SyntheticConfig) -> World:
    rng = np.random.default_rng([config.seed, 0])
    m, t, d = config.items, config.topics, config.dim
    # Every topic gets at least one item; the rest are spread at random.
    item_topic = np.concatenate([np.arange(t), rng.integers(0, t, m - t)])[rng.permutation(m)]
    order = np.lexsort((rng.random(m), item_topic))
    topic_start = np.searchsorted(item_topic[order], np.arange(t + 1))
    item_rank = np.empty(m, dtype=np.int64)
    item_rank[order] = np.arange(m) - topic_start[item_topic[order]]

    categories = (t + config.topics_per_category - 1) // config.topics_per_category
    category_dirs = _unit(rng.standard_normal((categories, d)))
    topic_dirs = _unit(rng.standard_normal((t, d)))
    centres = _unit(0.6 * category_dirs[np.arange(t) // config.topics_per_category] + 0.8 * topic_dirs)
    noise = rng.standard_normal((m, d)) * (config.content_noise / np.sqrt(d))
    content = _unit(centres[item_topic] + noise).astype(np.float32)

    k = config.interests_per_user
    interests = np.argsort(rng.random((config.users, t)), axis=1)[:, :k]
    weights = rng.dirichlet(np.full(k, 2.0), size=config.users)

    # Text a title encoder can separate: a word naming the topic, two words of its category.
    words = len(_WORDS)
    topic_name = [_WORDS[i % words] + (str(i // words) if i >= words else "") for i in range(t)]
    category_words = [[_WORDS[(6 * c + j + 11) % words] for j in range(6)] for c in range(categories)]
    first = rng.integers(0, 6, m)
    second = (first + rng.integers(1, 6, m)) % 6
    titles = [
        f"topic-{tp} {topic_name[tp]} {category_words[tp // config.topics_per_category][a]} "
        f"{category_words[tp // config.topics_per_category][b]} item {i}"
        for i, (tp, a, b) in enumerate(zip(item_topic.tolist(), first.tolist(), second.tolist()))
    ]
    return World(item_topic, order.astype(np.int64), topic_start.astype(np.int64), item_rank,
                 centres.astype(np.float32), content, interests, weights, titles)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sample_items(rng: np.random.Generator, world: World, topics: np.ndarray, exponent: float,
                  uniform_share: float = 0.0) -> np.ndarray:
    """One item per entry of `topics` (any shape): a power-law rank inside the topic, O(1) each.

    Inverse CDF of a continuous power law on [1, n + 1), floored to a rank; `uniform_share` of
    the draws take a uniform rank instead (long-tail targets).
    """
    # float32 is exact enough for ranks below 2^24 and halves the memory traffic.
    size = (world.topic_start[1:] - world.topic_start[:-1]).astype(np.float32)[topics]
    u = rng.random(topics.shape, dtype=np.float32)
    if abs(exponent - 1.0) < 1e-9:
        rank = np.floor(np.exp(u * np.log(size + 1))) - 1
    else:
        a = np.float32(1.0 - exponent)
        rank = np.floor((1 + u * ((size + 1) ** a - 1)) ** (1 / a)) - 1
    if uniform_share > 0:
        flat = rng.random(topics.shape, dtype=np.float32) < uniform_share
        rank = np.where(flat, np.floor(rng.random(topics.shape, dtype=np.float32) * size), rank)
    rank = np.clip(rank.astype(np.int64), 0, size.astype(np.int64) - 1)
    return world.topic_items[world.topic_start[topics] + rank]


def _behaviour_topics(rng: np.random.Generator, config: SyntheticConfig, world: World,
                      users: np.ndarray, length: int, dormant_allowed: np.ndarray) -> np.ndarray:
    """Topics [B, length]: sessions of one interest; dormant interest only where allowed.

    dormant_allowed: bool [length], True where interest 0 may be chosen.
    """
    s = config.session_len
    sessions = -(-length // s)
    w = world.weights[users]  # [B, K]
    with_dormant = w / w.sum(1, keepdims=True)
    without = w.copy()
    without[:, 0] = 0.0
    without /= np.maximum(without.sum(1, keepdims=True), 1e-12)
    if config.interests_per_user == 1:
        without = with_dormant  # a single interest is never dormant
    old = dormant_allowed[np.arange(sessions) * s]
    cum = np.cumsum(np.where(old[None, :, None], with_dormant[:, None, :], without[:, None, :]), axis=2)
    choice = (rng.random((len(users), sessions, 1)) > cum).sum(2)
    choice = np.minimum(choice, config.interests_per_user - 1)
    session_topics = np.take_along_axis(world.interests[users], choice, axis=1)
    topics = np.repeat(session_topics, s, axis=1)[:, :length]
    noisy = rng.random(topics.shape, dtype=np.float32) < config.noise_rate
    return np.where(noisy, rng.integers(0, config.topics, topics.shape), topics)


def _timestamps(rng: np.random.Generator, count: int, length: int, begin: int, span: int) -> np.ndarray:
    """int64 [count, length]: strictly increasing per row, inside [begin, begin + span)."""
    gaps = rng.standard_exponential(size=(count, length + 1))
    cum = np.cumsum(gaps, axis=1)
    frac = cum[:, :length] / cum[:, length:]
    return begin + np.floor(frac * (span - length)).astype(np.int64) + np.arange(length)


def _impressions(rng: np.random.Generator, config: SyntheticConfig, world: World, users: np.ndarray,
                 count: int, begin: int, span: int) -> dict[str, np.ndarray]:
    """`count` impressions per user at uniform times in [begin, begin + span), with click labels."""
    b = len(users)
    own = rng.random((b, count)) < 0.3
    pick = rng.integers(0, config.interests_per_user, (b, count))
    topics = np.where(own, np.take_along_axis(world.interests[users], pick, axis=1),
                      rng.integers(0, config.topics, (b, count)))
    items = _sample_items(rng, world, topics, config.popularity_exponent, uniform_share=0.5)
    # Closeness of the target's content to any interest, however old the behaviour showing it.
    sims = np.einsum("bcd,bkd->bck", world.content[items], world.centres[world.interests[users]])
    logit = 6.0 * (sims.max(2) - 0.45) - 0.3 * np.log1p(world.item_rank[items]) / np.log(10.0)
    label = (rng.random((b, count)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    ts = begin + np.sort(rng.integers(0, span, (b, count)), axis=1)
    return {"user": np.repeat(users, count), "item": items.reshape(-1), "ts": ts.reshape(-1), "label": label.reshape(-1)}


@dataclass
class Block:
    """The rows of one block of users (user / item indices are 0-based, not raw ids)."""

    events: dict[str, np.ndarray]
    impressions: dict[str, np.ndarray]
    daily: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]  # per day: (events, impressions)


def _blocks(config: SyntheticConfig, world: World) -> Iterator[Block]:
    start = start_ts(config)
    span = config.history_days * DAY
    length = config.history_len
    dormant_allowed = np.arange(length) < config.dormant_fraction * length
    for index, u0 in enumerate(range(0, config.users, config.users_per_block)):
        rng = np.random.default_rng([config.seed, 1, index])
        users = np.arange(u0, min(u0 + config.users_per_block, config.users))
        topics = _behaviour_topics(rng, config, world, users, length, dormant_allowed)
        items = _sample_items(rng, world, topics, config.popularity_exponent)
        ts = _timestamps(rng, len(users), length, start - span, span)
        events = {"user": np.repeat(users, length), "item": items.reshape(-1), "ts": ts.reshape(-1)}
        impressions = _impressions(rng, config, world, users, config.impressions_per_user,
                                   start - span // 10, span // 10)
        daily = []
        never_dormant = np.zeros(config.daily_events_per_user, dtype=bool)
        for day in range(config.days):
            n = config.daily_events_per_user
            day_topics = _behaviour_topics(rng, config, world, users, n, never_dormant)
            day_events = {
                "user": np.repeat(users, n),
                "item": _sample_items(rng, world, day_topics, config.popularity_exponent).reshape(-1),
                "ts": _timestamps(rng, len(users), n, start + day * DAY, DAY).reshape(-1),
            }
            day_impressions = _impressions(rng, config, world, users, config.daily_impressions_per_user,
                                           start + day * DAY, DAY)
            daily.append((day_events, day_impressions))
        yield Block(events, impressions, daily)


# ---------------------------------------------------------------------- tables


def _events_table(rows: dict[str, np.ndarray]) -> pa.Table:
    # pa.array wraps int64 numpy without a copy; pa.table on raw numpy takes a slow path.
    return pa.table({
        "user_id": pa.array(rows["user"] + USER_ID_BASE),
        "item_id": pa.array(rows["item"] + ITEM_ID_BASE),
        "ts": pa.array(rows["ts"].astype(np.int64, copy=False)),
    })


def _impressions_table(rows: dict[str, np.ndarray]) -> pa.Table:
    return _events_table(rows).append_column("label", pa.array(rows["label"], pa.int8()))


def items_table(config: SyntheticConfig, world: World) -> pa.Table:
    return pa.table({
        "item_id": np.arange(config.items, dtype=np.int64) + ITEM_ID_BASE,
        "category_id": world.item_topic // config.topics_per_category + CATEGORY_ID_BASE,
        "title": world.titles,
    })


def users_table(config: SyntheticConfig, world: World) -> pa.Table:
    """user_id, segment (category of the strongest non-dormant interest), activity (0..4 at random)."""
    rng = np.random.default_rng([config.seed, 2])
    strongest = np.argmax(world.weights[:, 1:], axis=1) + 1 if config.interests_per_user > 1 else np.zeros(config.users, int)
    segment = world.interests[np.arange(config.users), strongest] // config.topics_per_category
    return pa.table({
        "user_id": np.arange(config.users, dtype=np.int64) + USER_ID_BASE,
        "segment": segment.astype(np.int64),
        "activity": rng.integers(0, 5, config.users).astype(np.int64),
    })


@dataclass
class SyntheticData:
    """In-memory result of `generate` (raw ids, contract tables)."""

    config: SyntheticConfig
    items: pa.Table
    users: pa.Table
    events: pa.Table
    impressions: pa.Table
    days: dict[str, tuple[pa.Table, pa.Table]]  # "YYYY-MM-DD" -> (events, impressions)
    content: np.ndarray  # float32 [M, D], row i = item_id ITEM_ID_BASE + i
    world: World


def generate(config: SyntheticConfig) -> SyntheticData:
    """All tables in memory; for small configs (tests, examples). `write` streams large ones."""
    config.check()
    world = build_world(config)
    blocks = list(_blocks(config, world))

    def cat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    days = {
        day_name(config, d): (
            _events_table(cat([b.daily[d][0] for b in blocks])),
            _impressions_table(cat([b.daily[d][1] for b in blocks])),
        )
        for d in range(config.days)
    }
    return SyntheticData(
        config, items_table(config, world), users_table(config, world),
        _events_table(cat([b.events for b in blocks])), _impressions_table(cat([b.impressions for b in blocks])),
        days, world.content, world,
    )


def write(config: SyntheticConfig, out_dir: str | os.PathLike) -> DataLayout:
    """Generate into a ready data folder: contract tables, vocabularies, store, embeddings.

    Events stream to disk one block of users at a time, so memory stays bounded at any scale.
    Day partitions go to daily/<YYYY-MM-DD>/{events,impressions}.parquet.
    """
    config.check()
    started = time.perf_counter()
    layout = DataLayout(out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    world = build_world(config)
    write_contract(items_table(config, world), layout.items, "items")
    write_contract(users_table(config, world), layout.users, "users")

    impressions, daily = [], [([], []) for _ in range(config.days)]
    schema = validate_table(_events_table(_EMPTY), "events").schema
    # Parquet encoding runs in a second thread (it releases the GIL) while numpy generates the
    # next block; at most one block waits, so memory stays at about two blocks.
    with atomic_path(layout.events) as tmp, pq.ParquetWriter(tmp, schema, compression="lz4", use_dictionary=False) \
            as writer, ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for n, block in enumerate(_blocks(config, world), 1):
            # Rows are distinct by construction (strictly increasing ts per user).
            table = validate_table(_events_table(block.events), "events", layout.events, deduplicate=False)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_table, table)
            impressions.append(_impressions_table(block.impressions))
            for d, (ev, im) in enumerate(block.daily):
                daily[d][0].append(_events_table(ev))
                daily[d][1].append(_impressions_table(im))
            log.info("synthetic: %d of %d users generated", min(n * config.users_per_block, config.users), config.users)
        if pending is not None:
            pending.result()
    write_contract(pa.concat_tables(impressions), layout.impressions, "impressions")
    for d, (ev, im) in enumerate(daily):
        folder = layout.root / "daily" / day_name(config, d)
        write_contract(pa.concat_tables(ev), folder / "events.parquet", "events")
        write_contract(pa.concat_tables(im), folder / "impressions.parquet", "impressions")
    log.info("synthetic: tables written in %.1f s", time.perf_counter() - started)

    finalize(layout)
    write_item_embeddings(layout, np.arange(config.items) + ITEM_ID_BASE, world.content, "synthetic")
    log.info("synthetic: folder %s ready in %.1f s", layout.root, time.perf_counter() - started)
    return layout


_EMPTY = {"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64), "ts": np.zeros(0, np.int64)}


def config_from_args(**overrides) -> SyntheticConfig:
    """A config from keyword overrides, ignoring None (unset command-line options)."""
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    return SyntheticConfig(**{k: v for k, v in overrides.items() if k in fields and v is not None})
