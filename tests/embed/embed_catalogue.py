"""A small catalogue with clear structure: four themes, users who stay within a theme.

Items of one theme share words in their titles and a genre, and users engage items of one theme
in a row, so both the text and the behaviour signal say which items belong together. Some items
have images (small generated PNGs), one image file is corrupt, one item has an empty title.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.vocab import Vocab
from recsys.embed.config import EmbedConfig
from recsys.paths import DataLayout

THEMES = {
    "space": ("Star Voyage", "Sci-Fi|Adventure"),
    "love": ("Paris Romance", "Romance|Drama"),
    "horror": ("Night Terror", "Horror|Thriller"),
    "cartoon": ("Funny Animals", "Animation|Children's"),
}
PER_THEME = 8
EMPTY_TITLE_ID = 1003  # a space item with no title, but an image and behaviour
BROKEN_IMAGE_ID = 2001
COLOURS = {"space": (10, 10, 80), "love": (220, 60, 90), "horror": (20, 20, 20), "cartoon": (250, 220, 40)}


def theme_of(item_id: int) -> str:
    return list(THEMES)[item_id // 1000 - 1]


def write_catalogue(root: Path, seed: int = 0) -> DataLayout:
    """Write items, events, an item vocabulary and images under `root`."""
    rng = np.random.default_rng(seed)
    layout = DataLayout(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    ids, cats, titles, genres, images = [], [], [], [], []
    for t, (theme, (name, genre)) in enumerate(THEMES.items()):
        for k in range(PER_THEME):
            item = (t + 1) * 1000 + k
            ids.append(item)
            cats.append(t + 1)
            titles.append("" if item == EMPTY_TITLE_ID else f"{name} {k + 1}")
            genres.append(genre)
            image = None
            if k % 2 == 1:  # odd items have an image, the empty-title item 1003 among them
                image = f"images/{item}.png"
                pixels = np.clip(np.array(COLOURS[theme]) + rng.integers(-20, 20, size=(40, 48, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / image)
            if item == BROKEN_IMAGE_ID:
                image = f"images/{item}.png"
                (root / image).write_bytes(b"not a png")
            images.append(image)
    items = pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "category_id": pa.array(cats, pa.int64()),
            "title": pa.array(titles, pa.string()),
            "genres": pa.array(genres, pa.string()),
            "image": pa.array(images, pa.string()),
        }
    )
    pq.write_table(items, layout.items)

    users, event_items, ts = [], [], []
    for user in range(60):
        theme = user % len(THEMES)
        pool = [i for i in ids if (i // 1000 - 1) == theme]
        for step, item in enumerate(rng.choice(pool, size=12)):
            users.append(user)
            event_items.append(int(item))
            ts.append(1_000_000 + user * 100 + step)
    pq.write_table(
        pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(event_items, pa.int64()), "ts": pa.array(ts, pa.int64())}),
        layout.events,
    )
    layout.vocab_dir.mkdir(parents=True, exist_ok=True)
    Vocab.from_values(np.array(ids), "item_id").save(layout.vocab("item_id"))
    return layout


def small_config() -> EmbedConfig:
    """Real encoders, small training budgets: the whole stage in a few seconds plus model loading."""
    return EmbedConfig.from_dict(
        {
            "text": {"batch_size": 16},
            "image": {"enabled": True, "size": 32, "factory_kwargs": {"out_dim": 16, "width": 8}, "batch_size": 8},
            "cooc": {"dim": 16, "epochs": 3, "batch_size": 64, "window": 2},
            "align": {"dim": 128, "hidden": 64, "epochs": 10, "batch_size": 64, "queue_size": 128},
            "ray": {"num_cpus": 2, "actors": 1},
        }
    )
