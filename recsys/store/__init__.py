"""Stores read on the hot path: per-user behaviour sequences and item embedding tables."""
from recsys.store.embedding_table import EmbeddingTable
from recsys.store.sequence_store import HistoryBatch, SequenceStore

__all__ = ["EmbeddingTable", "HistoryBatch", "SequenceStore"]
