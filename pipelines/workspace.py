"""The pipeline workspace: date partitions, stage folders, markers and the run lock.

    <root>/
      .lock                          held (flock) by the process running stages
      dt=YYYY-MM-DD/
        <stage>/                     a committed stage output; present only when complete
          _SUCCESS.json              completion marker (see `Marker`)
        .<stage>.staging-<id>/       an attempt in progress (or killed); never read
        _attempt.json                the last attempt on this date: per-stage outcome
      mlflow/                        tracking database and artifacts (shared by all dates)

A stage folder appears only through one `rename` of a staging folder whose marker was written
last, so "the folder exists" and "the stage finished" are the same fact; a killed attempt leaves
only a dot-named staging folder, which the next attempt deletes.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipelines.errors import ConfigError, WorkspaceBusy

MARKER_NAME = "_SUCCESS.json"
ATTEMPT_NAME = "_attempt.json"
_PARTITION = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


def parse_date(text: str) -> dt.date:
    """'YYYY-MM-DD' -> date; a ConfigError naming the bad value otherwise."""
    try:
        return dt.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ConfigError(f"bad date {text!r}: expected YYYY-MM-DD") from None


def date_range(start: dt.date, end: dt.date) -> list[dt.date]:
    """Every date from start to end, both included."""
    if end < start:
        raise ConfigError(f"backfill range is empty: end {end} is before start {start}")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


@dataclass
class Marker:
    """What a completed stage records about itself (`_SUCCESS.json`)."""

    stage: str
    dt: str
    started: str  # ISO-8601 UTC
    finished: str
    duration_s: float
    inputs: dict[str, str]  # input name -> fingerprint of what was read
    output_fingerprint: str
    rows: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "Marker":
        return cls(**json.loads(path.read_text()))


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to `path` through a temporary file, fsync, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Workspace:
    """Paths and queries over one pipeline workspace root."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def partition(self, date: dt.date) -> Path:
        return self.root / f"dt={date.isoformat()}"

    def stage_dir(self, date: dt.date, stage: str) -> Path:
        return self.partition(date) / stage

    def marker(self, date: dt.date, stage: str) -> Marker | None:
        """The stage's completion marker on `date`, or None when the stage is not complete."""
        path = self.stage_dir(date, stage) / MARKER_NAME
        return Marker.read(path) if path.is_file() else None

    def dates(self) -> list[dt.date]:
        """Every date that has a partition folder, ascending."""
        if not self.root.is_dir():
            return []
        found = (_PARTITION.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(dt.date.fromisoformat(m.group(1)) for m in found if m)

    def previous_date(self, date: dt.date) -> dt.date | None:
        """The day before `date`, or None when no partition precedes `date` (the first day).

        Strictly the calendar day before, never "the latest earlier partition": a date that was
        never run must stop the dates after it rather than be silently skipped over.
        """
        return date - dt.timedelta(days=1) if any(d < date for d in self.dates()) else None

    def read_attempt(self, date: dt.date) -> dict[str, Any] | None:
        path = self.partition(date) / ATTEMPT_NAME
        return json.loads(path.read_text()) if path.is_file() else None

    def write_attempt(self, date: dt.date, attempt: dict[str, Any]) -> None:
        write_json_atomic(self.partition(date) / ATTEMPT_NAME, attempt)

    def remove_leftovers(self, date: dt.date, stage: str) -> None:
        """Delete staging/scratch/old folders a killed attempt of `stage` left behind."""
        part = self.partition(date)
        if part.is_dir():
            for p in part.glob(f".{stage}.*-*"):
                shutil.rmtree(p, ignore_errors=True)

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the workspace lock; WorkspaceBusy when another process has it.

        flock is released by the kernel when the holder dies, so a kill -9 never leaves the
        workspace locked.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkspaceBusy(f"another pipeline run holds {self.root / '.lock'}") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def marker_dict(marker: Marker) -> dict[str, Any]:
    return asdict(marker)
