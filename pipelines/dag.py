"""Running an ordered list of stages over one date or a range of dates.

Dates run in ascending order and stop at the first failure: later dates build on earlier ones
(the sequence store and the champion model carry over), so running past a failed date would
only fail again with "previous date not complete".
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from pipelines.errors import ConfigError, PipelineError
from pipelines.stage import Stage, StageOutcome, run_stage
from pipelines.workspace import Workspace

log = logging.getLogger("pipelines")


def validate_dag(stages: Sequence[Stage]) -> None:
    """Each same-date input must come earlier in the list; each carried stage must exist."""
    seen: set[str] = set()
    names = {s.name for s in stages}
    for s in stages:
        if s.name in seen:
            raise ConfigError(f"stage {s.name!r} is declared twice")
        late = [i for i in s.inputs if i not in seen]
        if late:
            raise ConfigError(f"stage {s.name!r} reads {late} before they run")
        unknown = [c for c in s.carries if c not in names]
        if unknown:
            raise ConfigError(f"stage {s.name!r} carries unknown stages {unknown}")
        seen.add(s.name)


@dataclass
class DateResult:
    date: dt.date
    outcomes: list[StageOutcome]
    error: PipelineError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def run_date(stages: Sequence[Stage], workspace: Workspace, date: dt.date, config: Any,
             force: frozenset[str] = frozenset()) -> DateResult:
    """Run every stage for `date` in order (skipping complete ones); record the attempt.

    `force` names stages to redo even when complete; their downstream stages then see changed
    input fingerprints and redo too.
    """
    validate_dag(stages)
    outcomes: list[StageOutcome] = []
    error: PipelineError | None = None
    started = time.time()
    workspace.partition(date).mkdir(parents=True, exist_ok=True)
    for stage in stages:
        t0 = time.time()
        try:
            outcomes.append(run_stage(stage, workspace, date, config, force=stage.name in force))
        except PipelineError as exc:
            outcomes.append(StageOutcome(stage.name, "failed", round(time.time() - t0, 3), str(exc)))
            error = exc
            log.error("%s %s: %s", date, stage.name, exc)
            break
    workspace.write_attempt(date, {
        "dt": date.isoformat(),
        "started": dt.datetime.fromtimestamp(started, tz=dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 3),
        "ok": error is None,
        "exit_code": 0 if error is None else error.exit_code,
        "stages": [asdict(o) for o in outcomes],
    })
    return DateResult(date, outcomes, error)


def run_dates(stages: Sequence[Stage], workspace: Workspace, dates: Sequence[dt.date], config: Any,
              force: frozenset[str] = frozenset()) -> list[DateResult]:
    """Run dates in ascending order under the workspace lock; stop at the first failed date."""
    results: list[DateResult] = []
    with workspace.lock():
        for date in sorted(dates):
            result = run_date(stages, workspace, date, config, force)
            results.append(result)
            if not result.ok:
                remaining = [d.isoformat() for d in sorted(dates) if d > date]
                if remaining:
                    log.error("stopping: %d later date(s) not run (%s ... %s)", len(remaining), remaining[0], remaining[-1])
                break
    return results


def status_rows(stages: Sequence[Stage], workspace: Workspace) -> list[dict[str, Any]]:
    """One row per (date, stage): done/failed/pending, when it finished and how long it took."""
    rows = []
    for date in workspace.dates():
        attempt = workspace.read_attempt(date) or {}
        failed = {o["stage"]: o["message"] for o in attempt.get("stages", []) if o["status"] == "failed"}
        for stage in stages:
            marker = workspace.marker(date, stage.name)
            if marker is not None:
                rows.append({"dt": date.isoformat(), "stage": stage.name, "state": "done",
                             "finished": marker.finished, "duration_s": marker.duration_s, "rows": marker.rows})
            else:
                rows.append({"dt": date.isoformat(), "stage": stage.name,
                             "state": "failed" if stage.name in failed else "pending",
                             "finished": None, "duration_s": None, "message": failed.get(stage.name, "")})
    return rows
