"""samples: the day's impressions split by time into train and test (recsys.train.split rule).

Per user, the last `test_fraction` of the day's impressions (by ts) are test, the rest train;
features are cut from the store strictly before each impression's ts at training time, so a
sample never sees its own future. Output: train.parquet, test.parquet.
"""
from __future__ import annotations

from pipelines.errors import InputInvalid
from pipelines.stage import StageContext
from recsys.schema import read_contract, write_parquet_atomic
from recsys.train.split import time_split


def test_fraction(config) -> float:
    return float(config.train.get("test_fraction", 0.1))


def run(ctx: StageContext) -> None:
    impressions = read_contract(ctx.input("ingest") / "impressions.parquet", "impressions")
    train, test = time_split(impressions, test_fraction(ctx.config))
    if train.num_rows == 0 or test.num_rows == 0:
        raise InputInvalid(f"{ctx.input('ingest') / 'impressions.parquet'}: the day's time split leaves {train.num_rows} train "
                           f"and {test.num_rows} test impressions; the day is too small to train on")
    write_parquet_atomic(train, ctx.output / "train.parquet")
    write_parquet_atomic(test, ctx.output / "test.parquet")
    ctx.rows.update(train=train.num_rows, test=test.num_rows)
