"""Image encoder: PIL decode -> resize + centre crop -> normalise -> any torch vision model.

The model comes from a factory named in config ("package.module:callable"), optionally loaded
with a state-dict file. No pretrained image weights can be fetched on this project's machines,
so the default factory, `small_cnn`, is a small randomly initialised network: it exercises the
whole pipeline (and gives near-duplicate images near-duplicate features) but carries no
semantics. Point `image.factory` / `image.weights` at a real model to get useful vectors.
"""
from __future__ import annotations

import importlib
import io
import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from recsys.embed.config import ImageConfig
from recsys.embed.encoders import Encoder

log = logging.getLogger(__name__)


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve "package.module:callable" to the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"image.factory must look like 'package.module:callable', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"image.factory {spec!r}: cannot import {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"image.factory {spec!r}: module {module_name!r} has no attribute {attr!r}") from None


def preprocess(image: str | bytes, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Decode one image (file path or encoded bytes) to a normalised float tensor [3, size, size].

    The shorter side is resized to `size` (bicubic) and the centre square is kept, so the aspect
    ratio is never distorted.
    """
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [S, S, 3]
    x = pixels.permute(2, 0, 1).float().div_(255.0)
    return (x - mean[:, None, None]) / std[:, None, None]


class ImageEncoder(Encoder):
    """Images (paths or bytes) -> L2-normalised float32 features [B, D].

    Inputs that PIL cannot decode give a zero row with ok False (a missing image), never an error
    for the whole batch: one corrupt file must not stop a catalogue run.
    """

    modality = "image"

    def __init__(self, config: ImageConfig, seed: int = 0):
        factory = load_factory(config.factory)
        # Seeded so every actor (and every run) builds the same network when no weights are given.
        torch.manual_seed(seed)
        model = factory(**config.factory_kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"image.factory {config.factory!r} returned {type(model).__name__}, not a torch nn.Module")
        if config.weights:
            state = torch.load(config.weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        self.model = model.eval()
        self.size = config.size
        self.batch_size = config.batch_size
        self.mean = torch.tensor(config.mean, dtype=torch.float32)
        self.std = torch.tensor(config.std, dtype=torch.float32)
        with torch.inference_mode():
            self.dim = int(self.model(torch.zeros(1, 3, self.size, self.size)).numel())

    def encode(self, inputs: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
        pixels: list[torch.Tensor] = []
        ok = np.zeros(len(inputs), dtype=bool)
        for i, image in enumerate(inputs):
            try:
                pixels.append(preprocess(image, self.size, self.mean, self.std))
                ok[i] = True
            except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
                log.warning("cannot decode image %d of batch (%s): %s", i, str(image)[:80], exc)
        vectors = np.zeros((len(inputs), self.dim), dtype=np.float32)
        if not pixels:
            return vectors, ok
        feats = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                out = self.model(torch.stack(pixels[start : start + self.batch_size]))
                feats.append(out.reshape(out.shape[0], -1).float())
        vectors[ok] = nn.functional.normalize(torch.cat(feats), dim=1).numpy()
        return vectors, ok


def small_cnn(out_dim: int = 64, width: int = 16) -> nn.Module:
    """A small conv net [B, 3, S, S] -> [B, out_dim] (random init unless weights are given)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, out_dim),
    )
