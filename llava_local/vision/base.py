"""The vision-backend interface, its options and its registry.

    from llava_local.vision import VisionOptions, create_backend
    backend = create_backend("native", read_mmproj("mmproj-F16.gguf"), VisionOptions(threads=8, max_batch=8))
    emb = backend.encode(images)               # (n_images, n_tokens, n_embd) float32
    backend.close()

A backend is a subclass of `VisionBackend` registered under its name with `@register_backend(name)`;
its constructor takes `(mmproj, options, llm=None)`. Options a backend has no use for are ignored
(every backend gets the same `VisionOptions`), so a caller can switch backends without changing them.
"""
from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from llava_local.errors import BackendUnavailableError, LlavaLocalError
from llava_local.formats.mmproj import MmprojInfo
from llava_local.image.preprocess import PreprocessConfig, preprocess_batch

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class VisionOptions:
    """How a vision backend runs. The engine fills the first four from EngineOptions and the placement.
    "gpu" is each backend's own GPU (torch: CUDA; native and mtmd: whatever llama.cpp was built with;
    onnx: the CUDA or CoreML provider), and the CPU where it has none."""
    device: str = "cpu"                 # cpu | gpu (the engine resolves "auto" before it gets here)
    threads: int | None = None          # CPU threads; None = the backend's default (all cores)
    workload: str = "session"           # oneshot | session | batch (runtime/options.py): native's F32 widening
    verbose: bool = False               # the library's own log and timings (mtmd)
    # native (libllava_vision)
    max_batch: int = 8                  # images per ggml graph; a longer list runs as several graphs
    flash_attn: bool | None = None      # None: the library's choice for the device (native/README.md)
    cpu_f32_weights: bool | None = None  # None: widen F16/BF16 to F32 at load, except for workload="oneshot"
    # onnx (onnxruntime)
    onnx_path: str | os.PathLike | None = None   # None: found next to the mmproj (onnx_backend.find_onnx_model)
    batch_size: int = 8                 # images per session.run: bounds the (B, 3, 336, 336) input and activations
    providers: tuple[str, ...] | None = None     # explicit execution providers instead of those for `device`

    def __post_init__(self):
        if self.device not in DEVICES:
            raise LlavaLocalError(f"vision device must be cpu or gpu, got {self.device!r}")


def preprocess_config(mmproj: MmprojInfo) -> PreprocessConfig:
    """The preprocessing an mmproj's encoder expects (its image size and normalisation; LLaVA-1.5 pad)."""
    return PreprocessConfig(image_size=mmproj.image_size, image_mean=tuple(mmproj.image_mean),
                            image_std=tuple(mmproj.image_std))


class VisionBackend(abc.ABC):
    """Encode images into LLM-space embeddings. Subclasses implement `_encode`."""

    name = "base"
    exact = False   # True: matches the PyTorch/transformers reference (no known graph defects)

    def __init__(self, mmproj: MmprojInfo):
        self.mmproj = mmproj
        self.preprocess_config = preprocess_config(mmproj)

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

    @abc.abstractmethod
    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (n_images, n_tokens, n_embd) float32."""

    def close(self) -> None:
        """Free what the backend holds (native contexts); safe to call twice."""

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter shutdown: the library may be gone already
            pass


class PixelBackend(VisionBackend):
    """A backend that takes the normalised pixel array (torch, onnx, native): the shared
    preprocessing, then `encode_pixels`."""

    @abc.abstractmethod
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) normalised pixels -> (B, n_tokens, n_embd) float32."""

    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode_pixels(preprocess_batch(images, self.preprocess_config))


BACKENDS: dict[str, type[VisionBackend]] = {}


def register_backend(name: str):
    def deco(cls):
        BACKENDS[name] = cls
        cls.name = name
        return cls
    return deco


def create_backend(name: str, mmproj: MmprojInfo, options: VisionOptions = VisionOptions(), *,
                   llm=None) -> VisionBackend:
    """Backend `name` for this mmproj; `llm` (a loaded LlamaLLM) is needed by mtmd only.
    BackendUnavailableError when the name is unknown or the backend cannot run here."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown vision backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name](mmproj, options, llm=llm)
