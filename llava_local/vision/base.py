"""The vision-backend interface and its registry."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from llava_local.errors import BackendUnavailableError
from llava_local.formats.mmproj import MmprojInfo
from llava_local.image.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


class VisionBackend:
    """Encode images into LLM-space embeddings. Subclasses implement `_encode_square`."""

    name = "base"
    exact = False   # True: matches the PyTorch/transformers reference (no known graph defects)

    def __init__(self, mmproj: MmprojInfo):
        self.mmproj = mmproj
        self.preprocess_config = PreprocessConfig(image_size=mmproj.image_size,
                                                  image_mean=tuple(mmproj.image_mean),
                                                  image_std=tuple(mmproj.image_std))

    @property
    def n_tokens(self) -> int:
        return self.mmproj.image_tokens

    @property
    def n_embd(self) -> int:
        return self.mmproj.projection_dim

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images (any size) -> (n_images, n_tokens, n_embd) float32."""
        out = self._encode(list(images))
        assert out.shape == (len(images), self.n_tokens, self.n_embd), out.shape
        return out

    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


BACKENDS: dict[str, Callable[..., VisionBackend]] = {}


def register_backend(name: str):
    def deco(cls):
        BACKENDS[name] = cls
        cls.name = name
        return cls
    return deco


def create_backend(name: str, mmproj: MmprojInfo, **kwargs) -> VisionBackend:
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown vision backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name](mmproj, **kwargs)
