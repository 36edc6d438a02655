import numpy as np
import pytest
import torch

from recsys.store.embedding_table import EmbeddingTable, EmbeddingTableError

DTYPES = ["float32", "float16", "bfloat16", "int8"]


def _vectors(rows=40, dim=128, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_unit_norm_and_row_zero_zero(dtype):
    table = EmbeddingTable.from_vectors(_vectors(), dtype)
    table.validate()
    rows = table.as_float()
    assert torch.count_nonzero(rows[0]) == 0
    norms = rows[1:].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    table = EmbeddingTable.from_vectors(_vectors(), dtype)
    table.save(tmp_path / "t")
    loaded = EmbeddingTable.load(tmp_path / "t")
    assert loaded.dtype == dtype
    assert loaded.scale == table.scale
    assert torch.equal(loaded.weights, table.weights)


def test_int8_within_one_step_of_float():
    v = _vectors()
    fp = EmbeddingTable.from_vectors(v, "float32").as_float()
    q = EmbeddingTable.from_vectors(v, "int8").as_float()
    assert (fp - q).abs().max() <= 1 / 127 + 1e-6


def test_lookup_shapes_and_out_of_range_ids_give_zero_rows():
    table = EmbeddingTable.from_vectors(_vectors(rows=5, dim=4), "float32")
    out = table.lookup(torch.tensor([[1, 2, 0], [99, -3, 4]]))
    assert out.shape == (2, 3, 4)
    assert torch.count_nonzero(out[1, :2]) == 0
    assert torch.allclose(out[0, 0], table.weights[1])


def test_all_zero_rows_stay_zero():
    v = _vectors(rows=4, dim=8)
    v[2] = 0
    table = EmbeddingTable.from_vectors(v)
    table.validate()
    assert torch.count_nonzero(table.as_float()[2]) == 0


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(EmbeddingTableError, match="NaN"):
        EmbeddingTable.from_vectors(np.full((3, 4), np.nan))
    with pytest.raises(EmbeddingTableError, match="unknown dtype"):
        EmbeddingTable.from_vectors(_vectors(3, 4), "float64")
    with pytest.raises(EmbeddingTableError, match="row 0"):
        EmbeddingTable(torch.ones(3, 4)).validate()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        EmbeddingTable.load(tmp_path / "missing")


def test_save_replaces_previous_table_without_leftovers(tmp_path):
    EmbeddingTable.from_vectors(_vectors(rows=3, dim=4)).save(tmp_path / "t")
    EmbeddingTable.from_vectors(_vectors(rows=6, dim=4)).save(tmp_path / "t")
    assert EmbeddingTable.load(tmp_path / "t").num_rows == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
