"""`muse pipeline run | backfill | status`: the daily batch pipeline from a scheduler.

Exit codes (see pipelines.errors): 0 ok, 1 a stage failed, 2 usage/config error, 3 input missing
(retry later), 4 input malformed, 5 another run holds the workspace.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipelines.config import PipelineConfig
from pipelines.errors import EXIT_OK, ConfigError, PipelineError
from pipelines.workspace import Workspace, date_range, parse_date

log = logging.getLogger("pipelines")

CONFIG_IN_WORKSPACE = "pipeline.yaml"


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="run, backfill and inspect the daily batch pipeline",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workspace", "-w", required=True, type=Path, help="pipeline workspace folder")
        p.add_argument("--config", "-c", type=Path,
                       help=f"pipeline config (YAML/JSON); default WORKSPACE/{CONFIG_IN_WORKSPACE}")
        p.add_argument("--force", nargs="+", default=[], metavar="STAGE",
                       help="redo these stages even if complete (their downstream stages follow)")

    run = sub.add_parser("run", help="run every stage of one date (complete stages are skipped)")
    run.add_argument("--date", required=True, help="YYYY-MM-DD")
    common(run)
    run.set_defaults(func=_run)

    backfill = sub.add_parser("backfill", help="run a range of dates in order, stopping at the first failure")
    backfill.add_argument("--start", required=True, help="first date, YYYY-MM-DD")
    backfill.add_argument("--end", required=True, help="last date (included), YYYY-MM-DD")
    common(backfill)
    backfill.set_defaults(func=_backfill)

    status = sub.add_parser("status", help="per date, which stages are done, when, and how long they took")
    status.add_argument("--workspace", "-w", required=True, type=Path)
    status.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    status.set_defaults(func=_status)


def _load_config(args) -> PipelineConfig:
    path = args.config or args.workspace / CONFIG_IN_WORKSPACE
    if not path.is_file():
        raise ConfigError(f"{path}: no pipeline config (pass --config, or put one at WORKSPACE/{CONFIG_IN_WORKSPACE})")
    return PipelineConfig.from_file(path)


def _execute(args, dates) -> int:
    from pipelines.daily import run_pipeline, stages

    try:
        config = _load_config(args)
        unknown = sorted(set(args.force) - {s.name for s in stages()})
        if unknown:
            raise ConfigError(f"--force: unknown stage(s) {unknown}; stages: {[s.name for s in stages()]}")
        results = run_pipeline(Workspace(args.workspace), dates, config, frozenset(args.force))
    except PipelineError as exc:
        log.error("%s", exc)
        return exc.exit_code
    for result in results:
        done = [o.stage for o in result.outcomes if o.status == "done"]
        skipped = [o.stage for o in result.outcomes if o.status == "skipped"]
        log.info("%s: %s (ran %s; already complete %s)", result.date, "ok" if result.ok else "FAILED",
                 done or "none", skipped or "none")
    failed = next((r for r in results if not r.ok), None)
    if failed is not None:
        log.error("%s failed: %s", failed.date, failed.error)
        return failed.error.exit_code
    return EXIT_OK


def _run(args) -> int:
    try:
        date = parse_date(args.date)
    except ConfigError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return _execute(args, [date])


def _backfill(args) -> int:
    try:
        dates = date_range(parse_date(args.start), parse_date(args.end))
    except ConfigError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return _execute(args, dates)


def _status(args) -> int:
    from pipelines.dag import status_rows
    from pipelines.daily import stages

    rows = status_rows(stages(), Workspace(args.workspace))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK
    if not rows:
        print(f"{args.workspace}: no dates yet")
        return EXIT_OK
    print(f"{'date':<12}{'stage':<10}{'state':<9}{'finished (UTC)':<27}{'seconds':>9}  detail")
    for r in rows:
        seconds = f"{r['duration_s']:.1f}" if r["duration_s"] is not None else "-"
        detail = ", ".join(f"{k}={v:,}" for k, v in (r.get("rows") or {}).items()) or r.get("message", "")
        print(f"{r['dt']:<12}{r['stage']:<10}{r['state']:<9}{r['finished'] or '-':<27}{seconds:>9}  {detail}")
    return EXIT_OK

