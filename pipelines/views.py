"""Data-folder views: a `DataLayout` assembled from committed stage folders with hard links.

Stages commit their pieces of a data folder separately (ingest: tables + vocab/, store: store/,
embed: embeddings/); the library's training and serving code reads one `DataLayout`. A view
links the pieces into one folder without copying bytes. Hard links rather than symlinks: a
view stays valid even if an old partition is deleted by a retention job, and a stage writing into
a view can never modify the committed file (every writer here replaces files by rename).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def link_tree(src: Path, dst: Path) -> None:
    """Recreate `src` (file or folder) at `dst` with hard links (copies across filesystems)."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            link_tree(child, dst / child.name)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def assemble(dst: Path, parts: dict[str, Path]) -> Path:
    """Build a folder at `dst` whose entry `name` is a hard-linked copy of `parts[name]`.

    Missing optional sources (value None or not existing) are left out.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for name, src in parts.items():
        if src is not None and src.exists():
            link_tree(src, dst / name)
    return dst
