"""Where every file of a data folder lives (see docs/design.md, "A data folder")."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def events(self) -> Path:
        return self.root / "events.parquet"

    @property
    def impressions(self) -> Path:
        return self.root / "impressions.parquet"

    @property
    def users(self) -> Path:
        return self.root / "users.parquet"

    @property
    def vocab_dir(self) -> Path:
        return self.root / "vocab"

    def vocab(self, name: str) -> Path:
        return self.vocab_dir / f"{name}.parquet"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def item_embeddings(self) -> Path:
        return self.embeddings_dir / "items.parquet"

    def embedding_table(self, dtype: str = "float16") -> Path:
        return self.embeddings_dir / f"table_{dtype}"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{(self.runs_dir / 'mlflow.db').resolve()}"
