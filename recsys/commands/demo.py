"""`muse demo`: the whole path on MovieLens-100K, in one command, in a workspace folder.

    data (MovieLens-100K from the recbole wheel) -> item embeddings (Ray, incremental)
    -> SequenceStore -> train MUSE and DIN (MLflow run each, registered; the better one is
    `champion`) -> evaluate (exact GAUC / AUC / logloss) -> batch score with the champion
    (Ray Data, the online Ranker)

Everything lands under the workspace (default ./workspace): the data folder, the MLflow sqlite
database and artifacts, the scores. No server needs starting: MLflow is a local sqlite file and
Ray starts in-process with 2 CPUs. Re-running reuses the data and the embeddings.
"""
from __future__ import annotations

import argparse
import functools
import logging
import time
from pathlib import Path

log = logging.getLogger("muse.demo")

MODELS = ("muse", "din")
SCORED_ROWS = 5_000


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the end-to-end path on MovieLens-100K",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", "-w", type=Path, default=Path("workspace"), help="output folder (default ./workspace)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model variants to train (default: muse din)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per model (default 1)")
    parser.add_argument("--max-steps", type=int, default=0, help="cap optimizer steps per model (0 = full epochs)")
    parser.add_argument("--wheel", type=Path, help="local recbole-1.2.1 wheel (default: fetched once with pip)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recsys.data.movielens import load_movielens
    from recsys.train.api import train_model
    from recsys.train.config import TrainConfig
    from recsys.train.registry import champion_version

    started = time.perf_counter()
    workspace = args.workspace.resolve()
    tracking_uri = f"sqlite:///{workspace / 'mlflow' / 'mlflow.db'}"
    (workspace / "mlflow").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with _step("1/4 data: MovieLens-100K -> contract tables, vocabularies, SequenceStore", timings, "data"):
        layout = load_movielens(workspace / "movielens", wheel=args.wheel)
    with _step("2/4 embeddings: item titles + co-occurrence -> 128-d vectors (Ray)", timings, "embed"):
        embed_summary = _embed(layout)
    results = {}
    for model in args.models:
        config = TrainConfig(model=model, epochs=args.epochs, max_steps=args.max_steps, registered_model="muse-ctr",
                             experiment="muse-demo")
        with _step(f"3/4 train + evaluate {model.upper()} (MLflow run, registered as muse-ctr)", timings, f"train_{model}"):
            results[model] = train_model(layout, config, out_dir=workspace / "training" / model,
                                         tracking_uri=tracking_uri, progress=False, run_name=f"demo-{model}")
    champion = champion_version("muse-ctr", tracking_uri)
    champion_model = next((m for m, r in results.items() if champion and r.version == str(champion.version)), None)
    with _step("4/4 batch scoring with the champion (Ray Data, the online Ranker)", timings, "score"):
        scores = _batch_score(workspace, layout, tracking_uri)
    timings["total"] = time.perf_counter() - started

    _print_summary(workspace, tracking_uri, results, champion, champion_model, scores, layout, embed_summary, timings)
    return 0


class _step:
    """Log a step's start and its wall time; store the time under `key`."""

    def __init__(self, title: str, timings: dict[str, float], key: str):
        self.title, self.timings, self.key = title, timings, key

    def __enter__(self):
        log.info("%s ...", self.title)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.key] = time.perf_counter() - self.t0
        if exc[0] is None:
            log.info("%s: done in %.1f s", self.title.split(" ", 1)[0], self.timings[self.key])


def _embed(layout) -> dict:
    from pipelines.embed_items import embed_items
    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    return embed_items(layout)


def _batch_score(workspace: Path, layout, tracking_uri: str):
    """Score the first test impressions with models:/muse-ctr@champion; returns the scored table."""
    import pyarrow.parquet as pq

    from pipelines.batch_score import batch_score
    from pipelines.ray_runtime import ensure_ray
    from recsys.schema import write_parquet_atomic
    from recsys.serving.ranker import Ranker
    from recsys.train.split import ensure_time_split

    split = ensure_time_split(layout)
    candidates = workspace / "scores" / "candidates.parquet"
    write_parquet_atomic(pq.read_table(split.test).slice(0, SCORED_ROWS), candidates)
    out = workspace / "scores" / "champion"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    factory = functools.partial(Ranker.load, "models:/muse-ctr@champion", str(layout.root), tracking_uri)
    ensure_ray()
    batch_score(candidates, out, factory)
    return pq.read_table(out)


def _print_summary(workspace, tracking_uri, results, champion, champion_model, scores, layout, embed_summary, timings) -> None:
    import polars as pl

    print()
    print("MovieLens-100K, time split (last 10% of each user's ratings = test), exact metrics on the test split")
    print(f"{'model':<8}{'GAUC':>8}{'AUC':>8}{'logloss':>9}{'version':>9}  champion")
    for model, r in results.items():
        m = r.metrics
        mark = "<- champion" if model == champion_model else ""
        print(f"{model:<8}{m['gauc']:>8.4f}{m['auc']:>8.4f}{m['logloss']:>9.4f}{r.version or '-':>9}  {mark}")
    if champion is not None:
        print(f"\nchampion: models:/muse-ctr@champion = version {champion.version} ({champion_model or 'an earlier run'})")
    encoded = embed_summary.get("encoded") or {}
    print(f"embeddings: {embed_summary.get('items', 0)} items ({'up to date, reused' if embed_summary.get('up_to_date') else f'encoded {encoded}'})")
    print(f"MLflow: {tracking_uri[len('sqlite:///'):]}")
    print(f"        browse with: mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    titles = pl.read_parquet(layout.items, columns=["item_id", "title"])
    shown = (pl.from_arrow(scores).head(8).join(titles, on="item_id", how="left")
             .select("user_id", "item_id", "title", "label", pl.col("score").round(4)))
    print(f"\nbatch scores ({scores.num_rows:,} rows) in {workspace / 'scores' / 'champion'}; the first few:")
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, fmt_str_lengths=40):
        print(shown)
    print("\nwall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
