"""Writing item vectors a source already has (synthetic content, TAOBAO-MM int8) as the folder's
embeddings, in the embedding stage's format, so the GSU and models run without that stage.

    embeddings/items.parquet   item_id, vector list<float32> [D], content_hash (dense vocab order)
    embeddings/table_float16/  EmbeddingTable
    embeddings/table_int8/     EmbeddingTable
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import torch

from recsys.data.vocab import Vocab
from recsys.paths import DataLayout
from recsys.schema import write_parquet_atomic

log = logging.getLogger(__name__)


def write_item_embeddings(
    layout: DataLayout,
    item_ids: np.ndarray,
    vectors: np.ndarray,
    source: str,
    int8_weights: np.ndarray | None = None,
) -> None:
    """Save vectors of raw `item_ids` [n] (float32 [n, D]) in dense vocab order.

    Items of the vocabulary without a vector get a zero row. `int8_weights` ([n, D] int8, scale
    1/127) is stored as the int8 table unchanged, instead of re-quantising `vectors`.
    """
    from recsys.embed.cache import vector_column
    from recsys.store.embedding_table import EmbeddingTable

    vocab = Vocab.load(layout.vocab("item_id"))
    dense = vocab.encode(np.asarray(item_ids, dtype=np.int64))
    known = dense > 0
    if not known.all():
        log.warning("%s: %d embedding row(s) of items outside the item vocabulary are skipped", source, int((~known).sum()))
    full = np.zeros((vocab.size, vectors.shape[1]), dtype=np.float32)
    full[dense[known]] = vectors[known]
    missing = vocab.size - 1 - int(np.count_nonzero(np.abs(full[1:]).sum(1)))
    if missing:
        log.warning("%s: %d of %d item(s) have no embedding (zero row)", source, missing, vocab.size - 1)
    EmbeddingTable.from_vectors(full, "float16").save(layout.embedding_table("float16"))
    if int8_weights is None:
        EmbeddingTable.from_vectors(full, "int8").save(layout.embedding_table("int8"))
    else:
        stored = np.zeros((vocab.size, int8_weights.shape[1]), dtype=np.int8)
        stored[dense[known]] = int8_weights[known]
        EmbeddingTable(torch.from_numpy(stored), 1.0 / 127.0).save(layout.embedding_table("int8"))
    normed = EmbeddingTable.from_vectors(full, "float32").weights.numpy()
    hashes = [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in full[1:]]
    table = pa.table({
        "item_id": pa.array(vocab.keys, pa.int64()),
        "vector": vector_column(normed[1:]),
        "content_hash": pa.array(hashes, pa.string()),
    }).replace_schema_metadata({b"source": source.encode(), b"dim": str(full.shape[1]).encode()})
    write_parquet_atomic(table, layout.item_embeddings)
