"""Contract validation: every bad input named in the contract is reported with file, column, rows."""
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.cli import UserError
from recsys.schema import ContractError, read_contract, validate_table, write_contract


def _events(**overrides):
    cols = {"user_id": [1, 2, 3], "item_id": [10, 20, 30], "ts": [100, 200, 300]}
    cols.update(overrides)
    return pa.table(cols)


def test_valid_events_are_conformed_to_contract_types():
    table = pa.table(
        {
            "ts": pa.array([5, 6], pa.int32()),
            "user_id": pa.array([1, 2], pa.int32()),
            "item_id": pa.array([3, 4], pa.uint16()),
            "weight": [1.0, 2.0],
        }
    )
    out = validate_table(table, "events", "e.parquet")
    assert out.column_names == ["user_id", "item_id", "ts", "weight"]
    assert out.schema.field("ts").type == pa.int64()
    assert out.schema.field("weight").type == pa.float32()
    assert out.column("item_id").to_pylist() == [3, 4]


def test_contract_error_is_a_user_error():
    assert issubclass(ContractError, UserError)


def test_missing_column_names_file_and_column():
    with pytest.raises(ContractError, match=r"e\.parquet: missing required column\(s\) \['ts'\]"):
        validate_table(pa.table({"user_id": [1], "item_id": [2]}), "events", "e.parquet")


def test_wrong_type_is_reported():
    with pytest.raises(ContractError, match=r"column 'user_id' has type string, expected int64"):
        validate_table(_events(user_id=["a", "b", "c"]), "events", "e.parquet")


def test_float_ids_are_refused():
    with pytest.raises(ContractError, match="'item_id' has type double"):
        validate_table(_events(item_id=[1.5, 2.0, 3.0]), "events", "e.parquet")


def test_overflowing_integer_is_reported():
    table = _events(user_id=pa.array([1, 2**63, 3], pa.uint64()))
    with pytest.raises(ContractError, match="'user_id' of type uint64 has values that do not fit int64"):
        validate_table(table, "events", "e.parquet")


def test_null_ids_report_first_rows():
    with pytest.raises(ContractError, match=r"column 'item_id': 2 null id\(s\); first rows \[0, 2\]"):
        validate_table(_events(item_id=[None, 20, None]), "events", "e.parquet")


def test_negative_timestamps_report_rows_and_values():
    with pytest.raises(ContractError, match=r"'ts': 1 negative timestamp\(s\); first rows \[1\] \(values \[-7\]\)"):
        validate_table(_events(ts=[1, -7, 3]), "events", "e.parquet")


def test_null_timestamps():
    with pytest.raises(ContractError, match=r"'ts': 1 null timestamp\(s\); first rows \[2\]"):
        validate_table(_events(ts=[1, 2, None]), "events", "e.parquet")


def test_labels_outside_zero_one():
    table = _events(label=[0, 2, 1])
    with pytest.raises(ContractError, match=r"i\.parquet: column 'label': 1 label\(s\) not in \{0, 1\}; first rows \[1\]"):
        validate_table(table, "impressions", "i.parquet")


def test_null_label():
    with pytest.raises(ContractError, match=r"label\(s\) not in \{0, 1\}; first rows \[0\]"):
        validate_table(_events(label=pa.array([None, 1, 0], pa.int8())), "impressions", "i.parquet")


def test_duplicate_events_dropped_with_count(caplog):
    table = _events(user_id=[1, 1, 1, 2], item_id=[10, 10, 10, 10], ts=[5, 5, 6, 5])
    with caplog.at_level(logging.WARNING, logger="recsys.schema"):
        out = validate_table(table, "events", "e.parquet")
    assert out.to_pydict() == {"user_id": [1, 1, 2], "item_id": [10, 10, 10], "ts": [5, 6, 5]}
    assert "dropped 1 duplicated (user_id, item_id, ts) event(s) of 4" in caplog.text


def test_duplicate_item_rows_are_an_error():
    items = pa.table({"item_id": [1, 2, 1], "category_id": [0, 0, 0], "title": ["a", "b", "c"]})
    with pytest.raises(ContractError, match=r"'item_id': 1 repeated id\(s\); first rows \[2\]"):
        validate_table(items, "items", "items.parquet")


def test_item_and_user_attributes_must_be_integer_codes():
    users = pa.table({"user_id": [1, 2], "age": pa.array([20, 30], pa.int16())})
    assert validate_table(users, "users").schema.field("age").type == pa.int64()
    with pytest.raises(ContractError, match="column 'gender' has type string"):
        validate_table(pa.table({"user_id": [1], "gender": ["M"]}), "users", "users.parquet")


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "sub" / "events.parquet"
    write_contract(_events(), path, "events")
    assert read_contract(path, "events").equals(validate_table(_events(), "events"))
    assert [p.name for p in path.parent.iterdir()] == ["events.parquet"]


def test_read_missing_file(tmp_path):
    with pytest.raises(ContractError, match="impressions table does not exist"):
        read_contract(tmp_path / "nope.parquet", "impressions")


def test_read_contract_reports_the_path(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(_events(ts=[1, 2, -3]), path)
    with pytest.raises(ContractError, match=rf"{path}: column 'ts'"):
        read_contract(path, "events")
