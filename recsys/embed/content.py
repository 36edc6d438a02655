"""Per-item, per-modality encoder inputs and their content hashes.

The hash of an item's input decides whether its cached features are still valid: an item is
re-encoded only when the hash of what its encoder would read has changed. Inputs are built
on the driver (cheap string work); the encoders run in Ray actors.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa


@dataclass(frozen=True)
class ModalityInputs:
    """One modality's inputs for a list of items (aligned with `item_ids`).

    Attributes:
        item_ids: raw int64 item ids, length B.
        inputs: per item the encoder input (text str, image path str or image bytes), None when
            the item has nothing usable for this modality.
        hashes: per item a hex digest of the input ("" when the input is None).
    """

    item_ids: list[int]
    inputs: list[str | bytes | None]
    hashes: list[str]

    @property
    def present(self) -> int:
        return sum(x is not None for x in self.inputs)


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def item_text(title: str | None, genres: str | None) -> str | None:
    """The sentence fed to the text encoder: "Title. Genre, Genre"; None when the title is empty.

    Genres alone are not treated as usable text: they would map every item of a genre to the same
    vector, which the category id already says.
    """
    title = (title or "").strip()
    if not title:
        return None
    genre_text = ", ".join(g.strip() for g in (genres or "").split("|") if g.strip())
    return f"{title}. {genre_text}" if genre_text else title


def text_inputs(items: pa.Table) -> ModalityInputs:
    ids = items.column("item_id").to_pylist()
    titles = items.column("title").to_pylist()
    genres = items.column("genres").to_pylist() if "genres" in items.column_names else [None] * len(ids)
    texts = [item_text(t, g) for t, g in zip(titles, genres)]
    hashes = [_digest(t.encode()) if t is not None else "" for t in texts]
    return ModalityInputs(ids, texts, hashes)


def image_inputs(items: pa.Table, root: Path) -> ModalityInputs:
    """Image inputs from the optional `image` column (a file path per item; see recsys/schema.py).

    Relative paths are resolved against the data folder `root`. A path's hash covers the path as
    written, size and modification time (as `make` does) rather than the bytes, so an unchanged
    catalogue is not re-read on every run and a copied data folder keeps its cache; an empty value
    or a missing file counts as no image.
    """
    ids = items.column("item_id").to_pylist()
    if "image" not in items.column_names:
        return ModalityInputs(ids, [None] * len(ids), [""] * len(ids))
    inputs: list[str | bytes | None] = []
    hashes: list[str] = []
    for value in items.column("image").to_pylist():
        # A relative path is relative to the data folder; an absolute one stays as it is.
        path = (root / value).resolve() if value else None
        try:
            st = path.stat() if path is not None else None
        except OSError:
            st = None
        if st is None:
            inputs.append(None)
            hashes.append("")
        else:
            inputs.append(str(path))
            hashes.append(_digest(value.encode(), str(st.st_size).encode(), str(st.st_mtime_ns).encode()))
    return ModalityInputs(ids, inputs, hashes)


def combine_hashes(*per_modality: str) -> str:
    """One item's content hash over all its modality hashes."""
    return _digest(*(h.encode() for h in per_modality))


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """Digest of a whole file's bytes (used to tell whether the events changed)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_text(text: str) -> str:
    return _digest(text.encode())
