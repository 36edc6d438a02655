"""Vocab: sorted keys -> 1..N, 0 = unknown, stable under extend and save/load."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.cli import UserError
from recsys.data.vocab import Vocab


def test_sorted_dense_indices_and_unknown_zero():
    vocab = Vocab.from_values(np.array([30, -5, 30, 7]), "item_id")
    assert len(vocab) == 3 and vocab.size == 4
    assert vocab.encode(np.array([-5, 7, 30, 99])).tolist() == [1, 2, 3, 0]
    assert vocab.encode(np.array([[30], [-5]])).shape == (2, 1)
    assert vocab.encode(np.array([1, 2])).dtype == np.int64


def test_decode_round_trip_and_unknown():
    vocab = Vocab.from_values(np.array([2**62, -(2**62), 0]))
    keys = np.array([0, 2**62, -(2**62)])
    assert vocab.decode(vocab.encode(keys)).tolist() == keys.tolist()
    with pytest.raises(ValueError, match=r"indices \[0, 4\] have no key"):
        vocab.decode(np.array([0, 1, 4]))
    assert vocab.decode(np.array([0, 1, 4]), unknown=-1).tolist() == [-1, -(2**62), -1]


def test_extend_appends_without_moving_existing():
    vocab = Vocab.from_values(np.array([10, 20, 30]))
    bigger = vocab.extend(np.array([25, 5, 20, 25]))
    assert bigger.encode(np.array([10, 20, 30])).tolist() == [1, 2, 3]
    assert bigger.encode(np.array([5, 25])).tolist() == [4, 5]
    assert len(vocab) == 3 and len(bigger) == 5
    assert bigger.extend(np.array([5, 10])) is bigger


def test_save_load_stable(tmp_path):
    vocab = Vocab.from_values(np.array([3, 1, 2])).extend(np.array([0]))
    path = tmp_path / "vocab" / "item_id.parquet"
    vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded.name == "item_id"
    assert loaded.keys.tolist() == [1, 2, 3, 0]
    assert loaded.encode(np.array([0, 3])).tolist() == [4, 3]
    assert pq.read_table(path).schema.field("key").type == pa.int64()
    assert [p.name for p in path.parent.iterdir()] == ["item_id.parquet"]


def test_empty_vocab():
    vocab = Vocab(np.array([], dtype=np.int64))
    assert vocab.encode(np.array([1, 2])).tolist() == [0, 0]
    assert vocab.size == 1


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="vocabulary file not found"):
        Vocab.load(tmp_path / "missing.parquet")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"]}), path)
    with pytest.raises(UserError, match="exactly one int64 column 'key'"):
        Vocab.load(path)


def test_repeated_keys_rejected():
    with pytest.raises(ValueError, match=r"repeated keys \[4\]"):
        Vocab(np.array([4, 1, 4]))


@pytest.mark.parametrize("spread", [1, 3, 2**40])  # lookup table, lookup table, sparse keys
@pytest.mark.parametrize("queries", [50, 300_000])  # binary search / hash join for sparse keys
def test_every_encode_path_agrees(spread, queries):
    rng = np.random.default_rng(spread)
    keys = np.unique(rng.integers(0, 5_000, 3_000)) * spread - 777
    vocab = Vocab(rng.permutation(keys))  # dense order is not sorted order
    extremes = [keys.min() - 1, keys.max() + 1, -(2**63), 2**63 - 1]  # wrap-around must not alias
    raw = np.concatenate([keys, keys + 1, extremes])
    raw = raw[rng.integers(0, len(raw), queries)]
    expected = np.array([np.flatnonzero(vocab.keys == k)[0] + 1 if k in set(keys) else 0 for k in raw[:50]])
    got = vocab.encode(raw)
    assert got.dtype == np.int64 and got[:50].tolist() == expected.tolist()
    known = got > 0
    assert np.array_equal(vocab.keys[got[known] - 1], raw[known])
    assert (~known == ~np.isin(raw, keys)).all()
    assert vocab.encode(np.array(extremes)).tolist() == [0, 0, 0, 0]
    assert vocab.encode(np.int64(keys[0])).shape == ()
