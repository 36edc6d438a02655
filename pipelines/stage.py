"""The stage model: one unit of work for one date, committed atomically with a marker.

A `Stage` names its same-date inputs (`inputs`), the stages of the previous date it builds on
(`carries`: cumulative state such as the sequence store or the champion model), the raw files it
reads (`sources`) and the files it must produce (`outputs`). `run_stage` runs it:

1. the fingerprints of everything it reads are computed first (upstream markers' output
   fingerprints, raw file digests, the stage's config section);
2. when the stage folder already holds a marker with the same input fingerprints, it is skipped;
3. otherwise the stage writes into a fresh staging folder, the declared outputs are checked, the
   output is fingerprinted, the marker is written last, and one `rename` puts the folder in place.

Fault injection: with `MUSE_PIPELINE_CRASH_AT=<stage>:<point>` set, the process kills itself
with SIGKILL when it reaches that point (`before_commit` in the runner, or any
`ctx.crash_point(...)` a stage calls), so tests can prove that resume gives identical outputs.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.errors import InputMissing, PipelineError, StageFailed
from pipelines.fingerprint import file_digest, params_digest, tree_digest
from pipelines.workspace import MARKER_NAME, Marker, Workspace, fsync_dir, marker_dict, write_json_atomic

CRASH_ENV = "MUSE_PIPELINE_CRASH_AT"
log = logging.getLogger("pipelines")


@dataclass(frozen=True)
class Stage:
    """A declared stage.

    Attributes:
        name: folder name under `dt=YYYY-MM-DD/`.
        fn: does the work: `fn(ctx)`; writes only under `ctx.output` (and `ctx.scratch`).
        inputs: same-date stages whose committed folders it reads (`ctx.input(name)`).
        carries: stages of the previous date it builds on (`ctx.previous(name)`, None on the first day).
        sources: `sources(date, config) -> {name: path}` raw files it reads; all must exist.
        outputs: relative paths that must exist in `ctx.output` before the commit.
        params: `params(config) -> JSON value`: the config this stage depends on (fingerprinted).
    """

    name: str
    fn: Callable[["StageContext"], None]
    inputs: tuple[str, ...] = ()
    carries: tuple[str, ...] = ()
    sources: Callable[[dt.date, Any], dict[str, Path]] | None = None
    outputs: tuple[str, ...] = ()
    params: Callable[[Any], Any] | None = None


@dataclass
class StageContext:
    """What a running stage sees: where to read, where to write, and how to report."""

    stage: Stage
    workspace: Workspace
    date: dt.date
    config: Any
    output: Path  # the staging folder: everything written here is committed together
    scratch: Path  # temporary working space, deleted after the stage
    previous_date: dt.date | None
    source_paths: dict[str, Path]
    rows: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> Path:
        """The committed folder of same-date stage `name` (declared in `inputs`)."""
        if name not in self.stage.inputs:
            raise KeyError(f"stage {self.stage.name!r} reads {name!r} without declaring it in inputs")
        return self.workspace.stage_dir(self.date, name)

    def previous(self, name: str) -> Path | None:
        """The committed folder of stage `name` on the previous date, or None on the first day."""
        if name not in self.stage.carries:
            raise KeyError(f"stage {self.stage.name!r} reads previous {name!r} without declaring it in carries")
        if self.previous_date is None:
            return None
        return self.workspace.stage_dir(self.previous_date, name)

    def source(self, name: str) -> Path:
        return self.source_paths[name]

    def crash_point(self, point: str) -> None:
        """SIGKILL this process here when MUSE_PIPELINE_CRASH_AT names `<stage>:<point>`."""
        if os.environ.get(CRASH_ENV) == f"{self.stage.name}:{point}":
            log.warning("fault injection: killing the process at %s:%s", self.stage.name, point)
            os.kill(os.getpid(), signal.SIGKILL)


def input_fingerprints(stage: Stage, workspace: Workspace, date: dt.date, config: Any) -> tuple[dict[str, str], dict[str, Path], dt.date | None]:
    """Fingerprint everything `stage` reads on `date`.

    Returns (fingerprints by input name, raw source paths, previous date). Raises InputMissing
    naming the missing file or incomplete upstream partition.
    """
    fps: dict[str, str] = {}
    for name in stage.inputs:
        marker = workspace.marker(date, name)
        if marker is None:
            raise InputMissing(f"{stage.name} on {date}: upstream stage {name!r} is not complete "
                               f"({workspace.stage_dir(date, name)} has no {MARKER_NAME})")
        fps[name] = marker.output_fingerprint
    previous = workspace.previous_date(date)
    for name in stage.carries:
        if previous is None:
            fps[f"previous:{name}"] = "none"
            continue
        marker = workspace.marker(previous, name)
        if marker is None:
            raise InputMissing(f"{stage.name} on {date} builds on {name!r} of {previous}, which is not complete; "
                               f"run or backfill {previous} first")
        fps[f"previous:{name}"] = marker.output_fingerprint
    sources = stage.sources(date, config) if stage.sources else {}
    for name, path in sources.items():
        if not Path(path).is_file():
            raise InputMissing(f"{stage.name} on {date}: input file {path} ({name}) does not exist")
        fps[f"source:{name}"] = file_digest(Path(path))
    if stage.params:
        fps["params"] = params_digest(stage.params(config))
    return fps, {k: Path(v) for k, v in sources.items()}, previous


@dataclass
class StageOutcome:
    stage: str
    status: str  # "done" | "skipped" | "failed"
    duration_s: float = 0.0
    message: str = ""


def run_stage(stage: Stage, workspace: Workspace, date: dt.date, config: Any, force: bool = False) -> StageOutcome:
    """Run `stage` for `date` unless its output is complete for the same inputs (see module doc).

    Raises a PipelineError subclass on failure; StageFailed wraps unexpected exceptions.
    """
    fps, sources, previous = input_fingerprints(stage, workspace, date, config)
    final = workspace.stage_dir(date, stage.name)
    existing = workspace.marker(date, stage.name)
    if existing is not None and existing.inputs == fps and not force:
        log.info("%s %s: complete (finished %s), skipping", date, stage.name, existing.finished)
        return StageOutcome(stage.name, "skipped")
    if existing is not None:
        log.info("%s %s: %s, re-running", date, stage.name, "forced" if force else "inputs changed")

    workspace.remove_leftovers(date, stage.name)
    token = uuid.uuid4().hex[:12]
    part = workspace.partition(date)
    part.mkdir(parents=True, exist_ok=True)
    staging = part / f".{stage.name}.staging-{token}"
    scratch = part / f".{stage.name}.scratch-{token}"
    staging.mkdir()
    scratch.mkdir()
    ctx = StageContext(stage, workspace, date, config, staging, scratch, previous, sources)
    started = time.time()
    log.info("%s %s: running", date, stage.name)
    try:
        stage.fn(ctx)
        missing = [o for o in stage.outputs if not (staging / o).exists()]
        if missing:
            raise StageFailed(f"{stage.name} on {date} finished without writing {missing}")
    except PipelineError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise StageFailed(f"{stage.name} on {date} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    finished = time.time()
    marker = Marker(
        stage=stage.name,
        dt=date.isoformat(),
        started=_iso(started),
        finished=_iso(finished),
        duration_s=round(finished - started, 3),
        inputs=fps,
        output_fingerprint=tree_digest(staging, exclude=frozenset({MARKER_NAME})),
        rows=dict(ctx.rows),
        summary=dict(ctx.summary),
    )
    ctx.crash_point("before_commit")
    write_json_atomic(staging / MARKER_NAME, marker_dict(marker))
    _commit(staging, final, token)
    log.info("%s %s: done in %.1fs %s", date, stage.name, marker.duration_s, _rows_text(marker.rows))
    return StageOutcome(stage.name, "done", marker.duration_s)


def _commit(staging: Path, final: Path, token: str) -> None:
    """Put `staging` at `final` with renames; a stale complete `final` is moved aside first.

    A kill between the two renames leaves no folder at `final`: the stage reads as not complete
    and the next attempt redoes it.
    """
    old = final.with_name(f".{final.name}.old-{token}")
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).isoformat(timespec="seconds")


def _rows_text(rows: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k}={v:,}" for k, v in rows.items()) + ")" if rows else ""
