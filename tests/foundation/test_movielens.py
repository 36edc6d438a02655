"""MovieLens-100K converter on a tiny fake recbole wheel; the real download only when reachable."""
import os
import zipfile

import numpy as np
import polars as pl
import pytest

from recsys.cli import UserError, main
from recsys.data import movielens
from recsys.data.folder import is_complete
from recsys.data.vocab import Vocab
from recsys.paths import DataLayout
from recsys.store import SequenceStore

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in [(7, 1, 5, 100), (7, 2, 3, 50), (9, 1, 4, 70), (9, 3, 1, 80), (7, 3, 4, 90)]
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tOdd \"Quoted\" Film\tunkonwn\tunknown\n"
    "3\tSolaris\t1972\tSci-Fi Drama\n"
)
USER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n7\t24\tM\ttechnician\t85711\n9\t53\tF\tother\t94043\n"


def fake_wheel(path, inter=INTER, item=ITEM, user=USER):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in (("inter", inter), ("item", item), ("user", user)):
            archive.writestr(f"{movielens.ARCHIVE_DIR}ml-100k.{name}", text)
    return path


def test_convert_fake_archive(tmp_path):
    layout = DataLayout(tmp_path / "ml")
    movielens.convert(fake_wheel(tmp_path / "fake.whl"), layout, expected=None)
    items = pl.read_parquet(layout.items).sort("item_id")
    assert items["title"].to_list() == ["Toy Story", 'Odd "Quoted" Film', "Solaris"]
    assert items["year"].to_list() == [1995, 0, 1972]  # "unkonwn" release year read as text -> 0
    assert items["genres"].to_list() == ["Animation|Children's|Comedy", "unknown", "Sci-Fi|Drama"]
    assert items["category_id"].to_list() == [movielens.GENRES.index(g) for g in ("Animation", "unknown", "Sci-Fi")]
    events = pl.read_parquet(layout.events)
    assert events.height == 5 and events["ts"].to_list() == [100, 50, 70, 80, 90]
    assert events["weight"].to_list() == [5.0, 3.0, 4.0, 1.0, 4.0]
    impressions = pl.read_parquet(layout.impressions)
    assert impressions["label"].to_list() == [1, 0, 1, 0, 1]
    users = pl.read_parquet(layout.users).sort("user_id")
    assert users.to_dict(as_series=False) == {"user_id": [7, 9], "age": [24, 53], "gender": [1, 0], "occupation": [1, 0]}


def test_load_movielens_builds_a_ready_folder_and_is_idempotent(tmp_path):
    wheel = fake_wheel(tmp_path / "fake.whl")
    layout = movielens.load_movielens(tmp_path / "ml", wheel=wheel, expected={"ratings": 5, "users": 2, "items": 3})
    assert is_complete(layout)
    store = SequenceStore.open(layout.store_dir)
    user7 = Vocab.load(layout.vocab("user_id")).encode(np.array([7]))
    batch = store.history(user7, np.array([95]), max_len=10, trim=True)
    item_vocab = Vocab.load(layout.vocab("item_id"))
    assert item_vocab.decode(batch.item_ids[0].numpy()).tolist() == [2, 3]  # ts 50, 90; not 100
    for name in ("user_age", "user_gender", "user_occupation", "item_year", "category_id"):
        assert layout.vocab(name).exists()
    stamp = layout.events.stat().st_mtime_ns
    os.remove(wheel)  # a complete folder needs no archive
    assert movielens.load_movielens(tmp_path / "ml", wheel=wheel) == layout
    assert layout.events.stat().st_mtime_ns == stamp


def test_count_check_fails_clearly(tmp_path):
    with pytest.raises(UserError, match=r"unexpected MovieLens-100K counts: ratings: 5 \(expected 100,000\), "
                                        r"users: 2 \(expected 943\), items: 3 \(expected 1,682\)"):
        movielens.load_movielens(tmp_path / "ml", wheel=fake_wheel(tmp_path / "fake.whl"))
    assert not (tmp_path / "ml" / "events.parquet").exists()


def test_bad_archives(tmp_path):
    (tmp_path / "junk.whl").write_text("not a zip")
    with pytest.raises(UserError, match="not a zip archive"):
        movielens.convert(tmp_path / "junk.whl", DataLayout(tmp_path / "a"), expected=None)
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(UserError, match="no recbole/dataset_example/ml-100k/ml-100k.inter inside"):
        movielens.convert(tmp_path / "empty.whl", DataLayout(tmp_path / "b"), expected=None)
    bad_rating = INTER.replace("\t5\t100", "\tfive\t100")
    with pytest.raises(UserError, match="column 'rating' is not numeric in rows \\[0\\]"):
        movielens.convert(fake_wheel(tmp_path / "r.whl", inter=bad_rating), DataLayout(tmp_path / "c"), expected=None)
    bad_genre = ITEM.replace("Sci-Fi Drama", "Sci-Fi Cooking")
    with pytest.raises(UserError, match=r"genres outside MovieLens' list: \['Cooking'\]"):
        movielens.convert(fake_wheel(tmp_path / "g.whl", item=bad_genre), DataLayout(tmp_path / "d"), expected=None)


def test_download_failure_names_the_fix(tmp_path, monkeypatch):
    class Done:
        returncode, stderr = 1, "ERROR: No matching distribution found"

    monkeypatch.setattr(movielens.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(UserError, match="(?s)could not download recbole==1.2.1 .* pass --wheel PATH"):
        movielens.fetch_wheel(tmp_path / "cache")


def test_cli_reports_user_errors(tmp_path, caplog):
    code = main(["data", "movielens", "--out", str(tmp_path / "ml"), "--wheel", str(fake_wheel(tmp_path / "f.whl"))])
    assert code == 2
    assert "unexpected MovieLens-100K counts" in caplog.text


def _real_wheel():
    cached = movielens.cache_dir() / movielens.WHEEL_NAME
    if cached.exists():
        return cached
    if os.environ.get("MUSE_TEST_DOWNLOAD") != "1":
        return None
    try:
        return movielens.fetch_wheel()
    except UserError:
        return None


@pytest.mark.slow
def test_real_movielens(tmp_path):
    wheel = _real_wheel()
    if wheel is None:
        pytest.skip("recbole wheel not cached; set MUSE_TEST_DOWNLOAD=1 to fetch it from PyPI")
    layout = movielens.load_movielens(tmp_path / "ml", wheel=wheel)
    store = SequenceStore.open(layout.store_dir)
    assert (store.num_users, store.num_items, store.num_behaviours) == (943, 1682, 100_000)
    assert pl.read_parquet(layout.impressions)["label"].mean() == pytest.approx(0.553, abs=0.01)
