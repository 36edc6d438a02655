"""MovieLens-100K -> contract tables, from the copy shipped inside the `recbole==1.2.1` wheel.

The wheel is fetched once with `pip download --no-deps` (PyPI is the one registry this project
can rely on) and cached under $MUSE_CACHE_DIR or ~/.cache/muse. A wheel is a zip; the data sit
in `recbole/dataset_example/ml-100k/` as tab-separated files with typed headers
(`user_id:token`, `timestamp:float`, ...). Licence: GroupLens terms (research use); the data are
never committed to this repository.

Conversion:
    items        item_id, category_id (code of the first genre), title, genres ("A|B"), year
                 (int64, 0 where the file's release_year is not a number)
    events       every rating: user_id, item_id, ts, weight = rating
    impressions  every rating: label = rating >= 4
    users        user_id, age, gender, occupation (int64 codes)
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import polars as pl

from recsys.cli import UserError
from recsys.data.folder import finalize, is_complete
from recsys.paths import DataLayout
from recsys.schema import write_contract

log = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
ARCHIVE_DIR = "recbole/dataset_example/ml-100k/"
EXPECTED_COUNTS = {"ratings": 100_000, "users": 943, "items": 1_682}
POSITIVE_RATING = 4
# The genre order of MovieLens' own u.genre file, so category codes match the original data set.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
GENDERS = {"F": 0, "M": 1}


def cache_dir() -> Path:
    """Where downloaded archives are kept: $MUSE_CACHE_DIR, else ~/.cache/muse."""
    return Path(os.environ.get("MUSE_CACHE_DIR") or Path.home() / ".cache" / "muse")


def fetch_wheel(cache: Path | None = None) -> Path:
    """Path of the cached recbole wheel, downloading it with pip on first use."""
    cache = cache or cache_dir()
    wheel = cache / WHEEL_NAME
    if wheel.exists():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (about 2 MB, holds MovieLens-100K) into %s", RECBOLE_REQUIREMENT, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", RECBOLE_REQUIREMENT, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_NAME
        if done.returncode != 0 or not got.exists():
            raise UserError(
                f"could not download {RECBOLE_REQUIREMENT} with pip (exit {done.returncode}): "
                f"{done.stderr.strip()[-500:]}\nDownload {WHEEL_NAME} yourself and pass --wheel PATH, "
                f"or put it in {cache}"
            )
        os.replace(got, wheel)
    return wheel


def _read_atomic_file(archive: zipfile.ZipFile, path: Path, name: str) -> pl.DataFrame:
    """One typed-header TSV of the archive as all-text columns named without their `:type`."""
    member = f"{ARCHIVE_DIR}ml-100k.{name}"
    try:
        raw = archive.read(member)
    except KeyError:
        raise UserError(f"{path}: no {member} inside; is this the {RECBOLE_REQUIREMENT} wheel?") from None
    frame = pl.read_csv(io.BytesIO(raw), separator="\t", quote_char=None, infer_schema=False)
    return frame.rename({c: c.split(":", 1)[0] for c in frame.columns})


def _as_int(frame: pl.DataFrame, column: str, path: Path, name: str) -> pl.Series:
    values = frame[column].cast(pl.Float64, strict=False)
    bad = values.is_null() & frame[column].is_not_null()
    if bad.any():
        rows = bad.arg_true()[:5].to_list()
        raise UserError(f"{path}: ml-100k.{name} column {column!r} is not numeric in rows {rows}")
    return values.cast(pl.Int64)


def read_archive(path: str | os.PathLike) -> dict[str, pl.DataFrame]:
    """The three MovieLens-100K files of a recbole wheel (or any zip with the same layout)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return {name: _read_atomic_file(archive, path, name) for name in ("inter", "item", "user")}
    except zipfile.BadZipFile:
        raise UserError(f"{path}: not a zip archive (a wheel is a zip)") from None


def check_counts(frames: dict[str, pl.DataFrame], path: Path, expected: dict[str, int]) -> None:
    """Fail unless ratings / users / items match `expected` exactly."""
    got = {"ratings": frames["inter"].height, "users": frames["user"].height, "items": frames["item"].height}
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    if wrong:
        detail = ", ".join(f"{k}: {g:,} (expected {e:,})" for k, (g, e) in wrong.items())
        raise UserError(f"{path}: unexpected MovieLens-100K counts: {detail}; the archive is not the one expected")


def convert(path: str | os.PathLike, layout: DataLayout, expected: dict[str, int] | None = EXPECTED_COUNTS) -> None:
    """Write items, events, impressions and users of the archive at `path` into `layout`."""
    path = Path(path)
    frames = read_archive(path)
    if expected is not None:
        check_counts(frames, path, expected)
    inter, item, user = frames["inter"], frames["item"], frames["user"]

    rating = inter["rating"].cast(pl.Float64, strict=False)
    if rating.is_null().any():
        raise UserError(f"{path}: ml-100k.inter column 'rating' is not numeric in rows {rating.is_null().arg_true()[:5].to_list()}")
    ratings = pl.DataFrame(
        {
            "user_id": _as_int(inter, "user_id", path, "inter"),
            "item_id": _as_int(inter, "item_id", path, "inter"),
            "ts": _as_int(inter, "timestamp", path, "inter"),
        }
    )
    events = ratings.with_columns(weight=rating.cast(pl.Float32))
    impressions = ratings.with_columns(label=(rating >= POSITIVE_RATING).cast(pl.Int8))

    genre_lists = item["class"].fill_null("").str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
    all_genres = genre_lists.explode().drop_nulls()
    unknown = all_genres.filter(~all_genres.is_in(GENRES)).unique()
    if len(unknown):
        raise UserError(f"{path}: ml-100k.item has genres outside MovieLens' list: {unknown.to_list()[:5]}")
    codes = {g: i for i, g in enumerate(GENRES)}
    items = pl.DataFrame(
        {
            "item_id": _as_int(item, "item_id", path, "item"),
            "category_id": genre_lists.list.first().replace_strict(codes, default=0, return_dtype=pl.Int64),
            "title": item["movie_title"],
            "genres": genre_lists.list.join("|"),
            # release_year holds text such as "unkonwn": unknown years become 0.
            "year": item["release_year"].cast(pl.Int64, strict=False).fill_null(0),
        }
    )

    gender = user["gender"]
    if not gender.is_in(list(GENDERS)).all():
        raise UserError(f"{path}: ml-100k.user column 'gender' holds values other than F/M: "
                        f"{gender.filter(~gender.is_in(list(GENDERS))).unique().to_list()[:5]}")
    occupations = {o: i for i, o in enumerate(sorted(user["occupation"].unique().to_list()))}
    users = pl.DataFrame(
        {
            "user_id": _as_int(user, "user_id", path, "user"),
            "age": _as_int(user, "age", path, "user"),
            "gender": gender.replace_strict(GENDERS, return_dtype=pl.Int64),
            "occupation": user["occupation"].replace_strict(occupations, return_dtype=pl.Int64),
        }
    )
    layout.root.mkdir(parents=True, exist_ok=True)
    write_contract(items.to_arrow(), layout.items, "items")
    write_contract(users.to_arrow(), layout.users, "users")
    write_contract(events.to_arrow(), layout.events, "events")
    write_contract(impressions.to_arrow(), layout.impressions, "impressions")
    log.info("MovieLens-100K: %d ratings, %d users, %d items (positive rate %.3f)",
             ratings.height, users.height, items.height, float(impressions["label"].mean()))


def load_movielens(
    out_dir: str | os.PathLike,
    wheel: str | os.PathLike | None = None,
    force: bool = False,
    expected: dict[str, int] | None = EXPECTED_COUNTS,
) -> DataLayout:
    """A ready MovieLens-100K data folder at `out_dir` (tables, vocabularies, store).

    Idempotent: a complete folder is returned as it is unless `force`. `wheel` points at a local
    copy of the recbole wheel; by default it is downloaded once into `cache_dir()`. `expected`
    are the counts the archive must hold (None: no check, for archives cut down for tests).
    """
    layout = DataLayout(out_dir)
    if is_complete(layout) and not force:
        log.info("MovieLens-100K already in %s", layout.root)
        return layout
    if force and layout.vocab_dir.exists():
        # A forced rebuild starts its vocabularies afresh rather than extending stale ones.
        shutil.rmtree(layout.vocab_dir)
    archive = Path(wheel) if wheel is not None else fetch_wheel()
    convert(archive, layout, expected)
    finalize(layout)
    return layout
