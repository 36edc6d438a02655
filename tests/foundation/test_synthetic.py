"""The generator: deterministic, streamed == in memory, point-in-time layout, and a real signal."""
import numpy as np
import polars as pl
import pytest
import torch

from recsys.cli import UserError
from recsys.data import synthetic
from recsys.data.synthetic import DAY, SyntheticConfig, generate, start_ts, write
from recsys.data.vocab import Vocab
from recsys.store import EmbeddingTable, SequenceStore

SMALL = SyntheticConfig(users=40, history_len=300, items=2000, topics=16, impressions_per_user=10, days=2,
                        daily_events_per_user=4, daily_impressions_per_user=3, start_date="2026-02-27", seed=5)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL)


def test_deterministic_and_seed_dependent(small):
    again = generate(SMALL)
    assert again.events.equals(small.events) and again.impressions.equals(small.impressions)
    assert again.items.equals(small.items) and np.array_equal(again.content, small.content)
    other = generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 6}))
    assert not other.events.equals(small.events)


def test_block_size_does_not_change_the_data(small, monkeypatch):
    monkeypatch.setattr(synthetic, "_BLOCK_ROWS", 1000)  # 3 users per block instead of all 40
    assert SMALL.users_per_block == 3
    smaller_blocks = generate(SMALL)
    assert smaller_blocks.items.equals(small.items)
    assert smaller_blocks.events.num_rows == small.events.num_rows


def test_histories_and_time_layout(small):
    start = start_ts(SMALL)
    events = pl.from_arrow(small.events)
    per_user = events.group_by("user_id").agg(pl.len(), pl.col("ts").diff().min().alias("min_gap"), pl.col("ts").max())
    assert per_user.height == SMALL.users and (per_user["len"] == SMALL.history_len).all()
    assert (per_user["min_gap"] > 0).all()  # strictly increasing: no duplicated events
    assert events["ts"].min() >= start - SMALL.history_days * DAY and events["ts"].max() < start
    impressions = pl.from_arrow(small.impressions)
    assert impressions.height == SMALL.users * SMALL.impressions_per_user
    assert impressions["ts"].min() >= start - SMALL.history_days * DAY // 10 and impressions["ts"].max() < start
    assert 0.1 < impressions["label"].mean() < 0.6
    assert list(small.days) == ["2026-02-27", "2026-02-28"]
    for d, (day_events, day_impressions) in enumerate(small.days.values()):
        for table in (day_events, day_impressions):
            ts = table.column("ts").to_numpy()
            assert ts.min() >= start + d * DAY and ts.max() < start + (d + 1) * DAY
        assert day_events.num_rows == SMALL.users * 4 and day_impressions.num_rows == SMALL.users * 3


def test_dormant_interest_only_in_the_oldest_part(small):
    world = small.world
    events = pl.from_arrow(small.events).with_columns(
        topic=pl.Series(world.item_topic[small.events.column("item_id").to_numpy() - synthetic.ITEM_ID_BASE]),
        user=pl.col("user_id") - synthetic.USER_ID_BASE,
        pos=pl.int_range(pl.len()).over("user_id"),
    )
    dormant = world.interests[events["user"].to_numpy(), 0] == events["topic"].to_numpy()
    recent = events["pos"].to_numpy() >= SMALL.dormant_fraction * SMALL.history_len + SMALL.session_len
    # Later on, the dormant topic appears only through random-topic noise.
    assert dormant[~recent].mean() > 5 * dormant[recent].mean()


def test_write_equals_generate_and_folder_is_ready(small, tmp_path):
    layout = write(SMALL, tmp_path / "syn")
    assert pl.read_parquet(layout.events).equals(pl.from_arrow(small.events))
    assert pl.read_parquet(layout.impressions).equals(pl.from_arrow(small.impressions))
    day_events = pl.read_parquet(layout.root / "daily" / "2026-02-28" / "events.parquet")
    assert day_events.equals(pl.from_arrow(small.days["2026-02-28"][0]))
    store = SequenceStore.open(layout.store_dir)
    assert store.num_behaviours == SMALL.users * SMALL.history_len
    vocab = Vocab.load(layout.vocab("item_id"))
    for dtype in ("float16", "int8"):
        table = EmbeddingTable.load(layout.embedding_table(dtype))
        table.validate()
        assert table.num_rows == vocab.size and table.dim == SMALL.dim
    table = EmbeddingTable.load(layout.embedding_table("float16"))
    dense = vocab.encode(np.arange(5) + synthetic.ITEM_ID_BASE)
    assert torch.allclose(table.lookup(torch.from_numpy(dense)), torch.from_numpy(small.content[:5]), atol=2e-3)
    rows = pl.read_parquet(layout.item_embeddings)
    assert rows["item_id"].to_list() == vocab.keys.tolist() and rows["vector"].list.len().min() == SMALL.dim


def _auc(scores, labels):
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(len(scores))
    pos = labels == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() - 1) / 2) / (pos.sum() * (~pos).sum())


def test_long_content_aware_history_predicts_clicks_better(tmp_path):
    config = SyntheticConfig(users=150, history_len=800, items=5000, impressions_per_user=20, seed=2)
    layout = write(config, tmp_path / "syn")
    store, table = SequenceStore.open(layout.store_dir), EmbeddingTable.load(layout.embedding_table("float16"))
    users, items = Vocab.load(layout.vocab("user_id")), Vocab.load(layout.vocab("item_id"))
    imp = pl.read_parquet(layout.impressions)
    u, target = users.encode(imp["user_id"].to_numpy()), torch.from_numpy(items.encode(imp["item_id"].to_numpy()))

    def score(max_len):
        batch = store.history(u, imp["ts"].to_numpy(), max_len)
        sims = torch.einsum("bld,bd->bl", table.lookup(batch.item_ids), table.lookup(target))
        return sims.masked_fill(~batch.mask(), -2).topk(10, dim=1).values.clamp_min(-1).mean(1).numpy()

    labels = imp["label"].to_numpy()
    short, long = _auc(score(50), labels), _auc(score(800), labels)
    assert long > short + 0.03 and long > 0.75


def test_bad_configs():
    with pytest.raises(UserError, match="must be >= 1"):
        SyntheticConfig(users=0).check()
    with pytest.raises(UserError, match="is not YYYY-MM-DD"):
        SyntheticConfig(start_date="01/02/2026").check()
    with pytest.raises(UserError, match="cannot fill"):
        SyntheticConfig(items=10, topics=64).check()


def test_cli(tmp_path, capsys):
    from recsys.cli import main

    code = main(["data", "synthetic", "--out", str(tmp_path / "d"), "--users", "5", "--history-len", "20",
                 "--items", "200", "--topics", "8", "--days", "2", "--start-date", "2026-05-30", "--history-days", "30"])
    assert code == 0 and '"num_behaviours": 100' in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "d" / "daily").iterdir()) == ["2026-05-30", "2026-05-31"]
    assert main(["data", "synthetic", "--out", str(tmp_path / "e"), "--users", "0"]) == 2
