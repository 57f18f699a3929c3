"""What the runtime needs to know about an mmproj GGUF, read and validated in Python (no llama.cpp).

    info = read_mmproj("model-mmproj-F16.gguf")   # raises ModelFilesError with a clear reason
    info.image_tokens, info.projection_dim, info.feature_layer
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from .errors import ModelFilesError
from .gguf_check import GGUFInfo, read_gguf_info
from .gguf_names import KEY_FEATURE_LAYER, KEY_LLAVA_LOCAL_IMAGE_TOKENS

K = gguf.Keys


@dataclass(frozen=True)
class MmprojInfo:
    path: Path
    gguf: GGUFInfo
    projector_type: str
    image_size: int
    patch_size: int
    hidden_size: int
    n_heads: int
    n_layers: int
    layer_norm_eps: float
    projection_dim: int
    feature_layer: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def mmproj_from_info(info: GGUFInfo) -> MmprojInfo:
    path = Path(info.path)
    if info.architecture != "clip":
        arch = info.architecture
        hint = " — this looks like an LLM GGUF; pass it as the model, not --mmproj" if arch and arch != "clip" else ""
        raise ModelFilesError(f"{path}: not an mmproj file (general.architecture is {arch!r}, expected 'clip'){hint}")
    ptype = info.get(K.Clip.PROJECTOR_TYPE)
    if ptype is None:
        raise ModelFilesError(f"{path}: mmproj has no {K.Clip.PROJECTOR_TYPE} (an old LLaVA GGUF? re-convert it)")
    if ptype != "mlp":
        raise ModelFilesError(f"{path}: projector type {ptype!r} unsupported (LLaVA-1.5 uses 'mlp')")
    if not info.get(K.Clip.HAS_VISION_ENCODER, False):
        raise ModelFilesError(f"{path}: mmproj has no vision encoder")
    for t in ("mm.0.weight", "mm.2.weight", "v.patch_embd.weight", "v.position_embd.weight"):
        if t not in info.tensors:
            raise ModelFilesError(f"{path}: mmproj lacks tensor {t}")
    n_layers = int(info.require(K.ClipVision.BLOCK_COUNT))
    fl = info.get(KEY_FEATURE_LAYER)
    feature_layer = int(fl[0]) if isinstance(fl, list) and fl else n_layers
    try:
        m = MmprojInfo(
            path=path, gguf=info, projector_type=ptype,
            image_size=int(info.require(K.ClipVision.IMAGE_SIZE)),
            patch_size=int(info.require(K.ClipVision.PATCH_SIZE)),
            hidden_size=int(info.require(K.ClipVision.EMBEDDING_LENGTH)),
            n_heads=int(info.require(K.ClipVision.Attention.HEAD_COUNT)),
            n_layers=n_layers,
            layer_norm_eps=float(info.get(K.ClipVision.Attention.LAYERNORM_EPS, 1e-5)),
            projection_dim=int(info.tensors["mm.2.weight"].shape[1]),   # ggml order: (in, out)
            feature_layer=feature_layer,
            image_mean=tuple(float(x) for x in info.require(K.ClipVision.IMAGE_MEAN)),
            image_std=tuple(float(x) for x in info.require(K.ClipVision.IMAGE_STD)),
        )
    except (TypeError, ValueError) as exc:
        raise ModelFilesError(f"{path}: malformed mmproj metadata ({exc})") from None
    if m.patch_size <= 0 or m.image_size % m.patch_size or not 0 < m.image_size <= 4096:
        raise ModelFilesError(f"{path}: image_size {m.image_size} / patch_size {m.patch_size} inconsistent")
    if not 1 <= m.feature_layer <= m.n_layers:
        raise ModelFilesError(f"{path}: feature layer {m.feature_layer} outside 1..{m.n_layers}")
    stored = info.get(KEY_LLAVA_LOCAL_IMAGE_TOKENS)
    if stored is not None and int(stored) != m.image_tokens:
        raise ModelFilesError(f"{path}: says {stored} image tokens but its geometry gives {m.image_tokens}")
    return m


def read_mmproj(path: str | Path) -> MmprojInfo:
    return mmproj_from_info(read_gguf_info(path))
