"""import-events: a user's own CSV/Parquet log with a column mapping."""
import logging

import numpy as np
import polars as pl
import pytest

from recsys.cli import UserError, main
from recsys.data.events import EventMapping, ItemMapping, hash_ids, import_events
from recsys.data.vocab import Vocab
from recsys.schema import ContractError
from recsys.store import SequenceStore

LOG = pl.DataFrame({
    "uid": ["alice", "alice", "bob", "alice", "bob"],
    "sku": [11, 12, 11, 13, 12],
    "when": ["2026-01-01T10:00:00", "2026-01-01T11:00:00", "2026-01-02 09:00:00", "2026-01-03T00:00:00", "2026-01-04"],
    "clicked": [1, 0, 1, 1, 0],
})
MAPPING = EventMapping("uid", "sku", "when", label_col="clicked")


def test_labelled_csv_with_text_ids_and_iso_times(tmp_path):
    LOG.write_csv(tmp_path / "log.csv")
    layout = import_events(tmp_path / "log.csv", MAPPING, tmp_path / "data")
    impressions = pl.read_parquet(layout.impressions)
    assert impressions["label"].to_list() == [1, 0, 1, 1, 0]
    assert impressions["ts"][0] == 1767261600  # 2026-01-01T10:00:00Z
    assert impressions["user_id"].to_list()[:2] == hash_ids(np.array(["alice", "alice"])).tolist()
    events = pl.read_parquet(layout.events)
    assert events.height == 3 and events["item_id"].to_list() == [11, 11, 13]  # positives only
    items = pl.read_parquet(layout.items)
    assert items.to_dict(as_series=False) == {"item_id": [11, 12, 13], "category_id": [0, 0, 0], "title": ["", "", ""]}
    store = SequenceStore.open(layout.store_dir)
    alice = Vocab.load(layout.vocab("user_id")).encode(hash_ids(np.array(["alice"])))
    assert store.lengths(alice).tolist() == [2]


def test_history_all_and_parquet_with_integer_ms(tmp_path):
    frame = pl.DataFrame({"u": [1, 1, 2], "i": [5, 6, 5], "t": [1_000_000, 2_000_000, 3_000_000], "y": [0, 1, 0]})
    frame.write_parquet(tmp_path / "log.parquet")
    layout = import_events(tmp_path / "log.parquet", EventMapping("u", "i", "t", "y", ts_unit="ms", history="all"),
                           tmp_path / "data")
    events = pl.read_parquet(layout.events)
    assert events["ts"].to_list() == [1000, 2000, 3000] and events.height == 3


def test_items_file_mapping_and_missing_items(tmp_path, caplog):
    LOG.write_csv(tmp_path / "log.csv")
    pl.DataFrame({"sku": [11, 12], "cat": [7, 8], "name": ["red shoe", "blue hat"]}).write_csv(tmp_path / "items.csv")
    with caplog.at_level(logging.WARNING):
        layout = import_events(tmp_path / "log.csv", MAPPING, tmp_path / "data", tmp_path / "items.csv",
                               ItemMapping("sku", "cat", "name"))
    items = pl.read_parquet(layout.items)
    assert items.to_dict(as_series=False) == {"item_id": [11, 12, 13], "category_id": [7, 8, 0],
                                              "title": ["red shoe", "blue hat", ""]}
    assert "1 item(s) of the log are not in" in caplog.text
    cats = SequenceStore.open(layout.store_dir).item_categories
    assert cats.tolist()[0] == 0 and len(set(cats.tolist()[1:])) == 3


def test_no_labels_gives_empty_impressions(tmp_path, caplog):
    LOG.drop("clicked").write_csv(tmp_path / "log.csv")
    with caplog.at_level(logging.WARNING):
        layout = import_events(tmp_path / "log.csv", EventMapping("uid", "sku", "when"), tmp_path / "data")
    assert pl.read_parquet(layout.impressions).height == 0
    assert pl.read_parquet(layout.events).height == 5
    assert "no --label-col" in caplog.text


def test_bad_logs(tmp_path):
    LOG.write_csv(tmp_path / "log.csv")
    with pytest.raises(UserError, match=r"log\.csv: no column --ts-col 'time'; the file has \['uid'"):
        import_events(tmp_path / "log.csv", EventMapping("uid", "sku", "time"), tmp_path / "d")
    LOG.with_columns(when=pl.Series(["yesterday", "2026-01-01", None, "2026-01-01", "soon"])).write_csv(tmp_path / "t.csv")
    with pytest.raises(UserError, match=r"column 'when' is not a date/time in rows \[0, 4\]"):
        import_events(tmp_path / "t.csv", MAPPING, tmp_path / "d")
    LOG.with_columns(clicked=pl.Series([1, 2, 0, 0, 1])).write_csv(tmp_path / "y.csv")
    with pytest.raises(ContractError, match=r"label\(s\) not in \{0, 1\}; first rows \[1\]"):
        import_events(tmp_path / "y.csv", MAPPING, tmp_path / "d")
    LOG.with_columns(sku=pl.Series([1, None, 3, 4, 5])).write_csv(tmp_path / "n.csv")
    with pytest.raises(UserError, match=r"column 'sku' has 1 null id\(s\); first rows \[1\]"):
        import_events(tmp_path / "n.csv", MAPPING, tmp_path / "d")
    LOG.with_columns(when=pl.Series([1, -5, 3, 4, 5])).write_csv(tmp_path / "neg.csv")
    with pytest.raises(ContractError, match=r"negative timestamp\(s\); first rows \[1\]"):
        import_events(tmp_path / "neg.csv", MAPPING, tmp_path / "d")
    (tmp_path / "log.json").write_text("{}")
    with pytest.raises(UserError, match="unknown format '.json'"):
        import_events(tmp_path / "log.json", MAPPING, tmp_path / "d")


def test_cli(tmp_path, capsys):
    LOG.write_csv(tmp_path / "log.csv")
    code = main(["data", "import-events", str(tmp_path / "log.csv"), "--user-col", "uid", "--item-col", "sku",
                 "--ts-col", "when", "--label-col", "clicked", "--out", str(tmp_path / "data")])
    assert code == 0 and '"num_behaviours": 3' in capsys.readouterr().out
    assert main(["data", "import-events", str(tmp_path / "log.csv"), "--user-col", "nope", "--item-col", "sku",
                 "--ts-col", "when", "--out", str(tmp_path / "data2")]) == 2
