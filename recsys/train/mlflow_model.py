"""The MLflow pyfunc of a trained CTR model, logged in "models from code" form (no pickling).

MLflow runs this file when the model is loaded (`mlflow.pyfunc.load_model("models:/NAME@champion")`);
it rebuilds the model from the logged `model_dir` artifact (config.json + weights loaded with
`torch.load(weights_only=True)` + features.json). `predict` takes a DataFrame of impressions with
raw ids (user_id, item_id, ts) and returns click probabilities; features come from a data folder
(its vocabularies, SequenceStore and embedding table): the folder the model was trained on, or
`params={"data_dir": ...}`. The online service uses `recsys.train.registry.load_registered`
instead, with its own store handles.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch

from recsys.data.vocab import Vocab
from recsys.features import FeatureBuilder
from recsys.models.io import load_feature_config, load_model_dir
from recsys.paths import DataLayout

_CHUNK_ROWS = 4096


class MuseCTRModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        model_dir = context.artifacts["model_dir"]
        self.model = load_model_dir(model_dir)
        self.feature_config = load_feature_config(model_dir)
        settings = context.model_config or {}
        self.data_dir = settings.get("data_dir")
        self.embedding_dtype = settings.get("embedding_dtype")
        self._folders: dict[str, tuple[FeatureBuilder, Vocab, Vocab]] = {}

    def _folder(self, data_dir: str) -> tuple[FeatureBuilder, Vocab, Vocab]:
        if data_dir not in self._folders:
            layout = DataLayout(data_dir)
            dtype = self.embedding_dtype if self.model.spec.multimodal or self.feature_config.gsu_policy == "muse" else None
            builder = FeatureBuilder.from_layout(layout, self.feature_config, table_dtype=dtype)
            self._folders[data_dir] = (builder, Vocab.load(layout.vocab("user_id")), Vocab.load(layout.vocab("item_id")))
        return self._folders[data_dir]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        """model_input: columns user_id, item_id, ts (raw int64 ids, seconds) -> float [N] probabilities."""
        missing = [c for c in ("user_id", "item_id", "ts") if c not in model_input.columns]
        if missing:
            raise ValueError(f"predict: input lacks column(s) {missing}; it needs user_id, item_id, ts")
        data_dir = (params or {}).get("data_dir") or self.data_dir
        if not data_dir:
            raise ValueError("predict: no data folder; pass params={'data_dir': ...}")
        builder, user_vocab, item_vocab = self._folder(str(data_dir))
        users = user_vocab.encode(model_input["user_id"].to_numpy())
        items = item_vocab.encode(model_input["item_id"].to_numpy())
        ts = model_input["ts"].to_numpy().astype(np.int64)
        id_embeddings = self.model.item_id_embeddings() if self.feature_config.gsu_policy == "sim-soft" else None
        out = []
        with torch.no_grad():
            for start in range(0, len(users), _CHUNK_ROWS):
                rows = slice(start, start + _CHUNK_ROWS)
                batch = builder.build(torch.from_numpy(users[rows]), torch.from_numpy(items[rows]).unsqueeze(1),
                                      torch.from_numpy(ts[rows]), id_embeddings=id_embeddings)
                out.append(torch.sigmoid(self.model(batch)).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


mlflow.models.set_model(MuseCTRModel())
