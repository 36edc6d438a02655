"""Sources -> contract tables, vocabularies and the store of a data folder (docs/foundation.md)."""
from recsys.data.vocab import Vocab

__all__ = ["Vocab", "load_movielens"]


def __getattr__(name: str):
    # Imported on first use: the sources import the store, which itself imports Vocab from here.
    if name == "load_movielens":
        from recsys.data.movielens import load_movielens

        return load_movielens
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
