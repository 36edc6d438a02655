"""Finishing a data folder: vocabularies stable across runs, item categories, store commands."""
import json

import numpy as np
import pyarrow as pa
import pytest

from recsys.cli import UserError, main
from recsys.data.folder import build_vocabs, finalize, is_complete, item_categories, load_vocabs
from recsys.paths import DataLayout
from recsys.schema import write_contract


def _folder(root, users=(5, 9), items=(100, 200, 300)):
    layout = DataLayout(root)
    write_contract(pa.table({"item_id": list(items), "category_id": [7, 7, 8][: len(items)],
                             "title": ["a", "b", "c"][: len(items)], "brand": [1, 2, 1][: len(items)]}),
                   layout.items, "items")
    write_contract(pa.table({"user_id": list(users), "age": [30, 40]}), layout.users, "users")
    write_contract(pa.table({"user_id": [5, 5, 9], "item_id": [100, 200, 400], "ts": [1, 2, 3]}), layout.events, "events")
    write_contract(pa.table({"user_id": [9], "item_id": [300], "ts": [9], "label": pa.array([1], pa.int8())}),
                   layout.impressions, "impressions")
    return layout


def test_vocabularies_cover_every_table_and_attributes(tmp_path):
    layout = _folder(tmp_path)
    vocabs = build_vocabs(layout)
    assert vocabs["item_id"].keys.tolist() == [100, 200, 300, 400]  # 400 only appears in events
    assert vocabs["user_id"].keys.tolist() == [5, 9]
    assert set(vocabs) == {"user_id", "item_id", "category_id", "user_age", "item_brand"}
    assert item_categories(layout, vocabs).tolist() == [0, 1, 1, 2, 0]  # item 400 has no category


def test_rebuild_extends_and_never_renumbers(tmp_path):
    layout = _folder(tmp_path)
    first = build_vocabs(layout)["item_id"]
    write_contract(pa.table({"user_id": [5, 1], "item_id": [50, 100], "ts": [4, 5]}), layout.events, "events")
    second = build_vocabs(layout)["item_id"]
    assert second.encode(first.keys).tolist() == [1, 2, 3, 4]
    assert second.encode(np.array([50])).tolist() == [5]
    assert load_vocabs(layout)["user_id"].keys.tolist() == [5, 9, 1]


def test_finalize_and_store_commands(tmp_path, capsys):
    layout = _folder(tmp_path)
    assert not is_complete(layout)
    finalize(layout)
    assert is_complete(layout)
    assert main(["store", "info", "--data", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_behaviours"] == 3 and info["history_length"]["p50"] == 1.5
    assert main(["store", "build", "--data", str(tmp_path), "--max-per-user", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["num_behaviours"] == 2


def test_missing_tables(tmp_path):
    with pytest.raises(UserError, match="items.parquet: missing"):
        build_vocabs(DataLayout(tmp_path))
    assert main(["store", "info", "--data", str(tmp_path)]) == 2
