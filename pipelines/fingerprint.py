"""Content fingerprints of files, folders and parameters (sha256, hex).

A fingerprint depends only on bytes and relative paths, never on timestamps or absolute
locations, so the same output written twice (an interrupted run resumed, or an uninterrupted one)
fingerprints the same.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of one file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_digest(root: Path, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 over the sorted (relative path, file digest) pairs of every file under `root`.

    `exclude` names top-level entries left out (the completion marker itself).
    Symlinks are followed: a stage that links an upstream file fingerprints its content.
    """
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in exclude)
    for path in files:
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(file_digest(path).encode())
        h.update(b"\n")
    return h.hexdigest()


def params_digest(params: Any) -> str:
    """sha256 of a JSON-serialisable value (keys sorted), e.g. a stage's config section."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
