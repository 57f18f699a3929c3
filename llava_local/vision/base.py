"""The vision-backend interface, its options and its registry.

    from llava_local.vision import VisionOptions, create_backend
    backend = create_backend("native", read_mmproj("mmproj-F16.gguf"), VisionOptions(threads=8, max_batch=8))
    embs = backend.embed(images)               # one (n_tokens_i, n_embd) float32 array per image, any model
    backend.tokens_for(width, height)          # n_tokens_i of an image of that size, before encoding it
    emb = backend.encode(images)               # (n_images, n_tokens, n_embd): fixed-size (LLaVA-1.5) models only
    backend.close()

A backend is a subclass of `VisionBackend` registered under its name with `@register_backend(name)`;
its constructor takes `(mmproj, options, llm=None)`. Options a backend has no use for are ignored
(every backend gets the same `VisionOptions`), so a caller can switch backends without changing them.

LLaVA-1.6 ("anyres", `mmproj.anyres`): an image takes as many tokens as its size gives it
(llava_local/image/anyres.py). The exact backends (`PixelBackend`: torch, onnx, native) encode the base
images and tiles of all images of one `embed` call in one `encode_pixels` batch and pack each image's
features with the mmproj's newline vector, as transformers' LlavaNext does; mtmd returns what
llama.cpp's clip graph makes of the image (its own tiling, no unpadding, no newlines).
"""
from __future__ import annotations

import abc
import functools
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from llava_local.errors import BackendUnavailableError, LlavaLocalError
from llava_local.formats.mmproj import MmprojInfo, read_image_newline
from llava_local.image.anyres import anyres_tiles, image_token_count, pack_features
from llava_local.image.preprocess import PreprocessConfig, normalize, preprocess_batch

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
    # LLaVA-1.6 (anyres) models; ignored by fixed-size ones
    max_tiles: int | None = None        # only pinpoints of at most this many tiles (None: all); fewer = faster

    def __post_init__(self):
        if self.device not in DEVICES:
            raise LlavaLocalError(f"vision device must be cpu or gpu, got {self.device!r}")
        if self.max_tiles is not None and (isinstance(self.max_tiles, bool) or not isinstance(self.max_tiles, int)
                                           or self.max_tiles < 1):
            raise LlavaLocalError(f"image max tiles must be a whole number of at least 1, got {self.max_tiles!r}")


def preprocess_config(mmproj: MmprojInfo) -> PreprocessConfig:
    """The preprocessing an mmproj's encoder expects (its image size and normalisation; LLaVA-1.5 pad)."""
    return PreprocessConfig(image_size=mmproj.image_size, image_mean=tuple(mmproj.image_mean),
                            image_std=tuple(mmproj.image_std))


class VisionBackend(abc.ABC):
    """Encode images into LLM-space embeddings. Subclasses implement `_encode` (fixed-size models) and,
    where they run anyres models, `_embed`."""

    name = "base"
    exact = False   # True: matches the PyTorch/transformers reference (no known graph defects)

    def __init__(self, mmproj: MmprojInfo, options: VisionOptions | None = None):
        self.mmproj = mmproj
        self.preprocess_config = preprocess_config(mmproj)
        self.max_tiles = options.max_tiles if options is not None else None
        if mmproj.anyres is not None:
            mmproj.anyres.pinpoints(mmproj.image_size, self.max_tiles)   # raises now if max_tiles leaves none

    @property
    def n_tokens(self) -> int:
        return self.mmproj.image_tokens

    @property
    def n_embd(self) -> int:
        return self.mmproj.projection_dim

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images (any size) -> (n_images, n_tokens, n_embd) float32. Fixed-size models only:
        an anyres image's token count depends on its size (use `embed`)."""
        if self.mmproj.anyres is not None:
            raise LlavaLocalError(f"{self.mmproj.path.name} is a LLaVA-1.6 (anyres) mmproj: images take different "
                                  "numbers of tokens, encode them with embed(), not encode()")
        out = self._encode(list(images))
        assert out.shape == (len(images), self.n_tokens, self.n_embd), out.shape
        return out

    def embed(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """RGB PIL images (any size) -> one (tokens_for(*image.size), n_embd) float32 array per image."""
        images = list(images)
        if self.mmproj.anyres is None:
            return list(self.encode(images))
        out = self._embed(images)
        assert len(out) == len(images), (len(out), len(images))
        return out

    def tokens_for(self, width: int, height: int) -> int:
        """Embeddings `embed` returns for an image of this size (LLaVA-1.5: always `n_tokens`)."""
        return image_token_count(self.mmproj, width, height, max_tiles=self.max_tiles)

    def _embed(self, images: list[Image.Image]) -> list[np.ndarray]:
        """RGB PIL images -> one (n_tokens_i, n_embd) array each, for an anyres mmproj."""
        raise LlavaLocalError(f"the {self.name} vision backend does not run LLaVA-1.6 (anyres) models")

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

    @functools.cached_property
    def image_newline(self) -> np.ndarray:
        """The anyres mmproj's (n_embd,) newline vector, read from the file once."""
        return read_image_newline(self.mmproj)

    def _embed(self, images: list[Image.Image]) -> list[np.ndarray]:
        """All images' base images and tiles in one `encode_pixels` batch, then packed image by image."""
        counts, pixels = [], []
        for img in images:
            tiles = anyres_tiles(img, self.mmproj, max_tiles=self.max_tiles)   # base + tiles, S x S each
            counts.append(len(tiles))
            pixels.extend(normalize(t, self.preprocess_config) for t in tiles)
        s = self.mmproj.image_size
        batch = np.stack(pixels) if pixels else np.empty((0, 3, s, s), np.float32)   # (sum(counts), 3, S, S)
        feats = self.encode_pixels(batch)                                            # (sum(counts), g*g, D)
        out, start = [], 0
        for img, n in zip(images, counts):
            out.append(pack_features(feats[start:start + n], self.image_newline, self.mmproj, *img.size,
                                     max_tiles=self.max_tiles))
            start += n
        return out


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
