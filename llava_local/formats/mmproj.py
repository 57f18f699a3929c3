"""What the runtime needs to know about an mmproj GGUF, read and validated in Python (no llama.cpp).

    info = read_mmproj("model-mmproj-F16.gguf")   # raises ModelFilesError with a clear reason
    info.image_tokens, info.projection_dim, info.feature_layer
    info.block_tensor_names(0)   # HF CLIP name -> GGUF name, FFN naming of this file resolved

Two layouts of the same LLaVA-1.5 mmproj are in circulation, and every backend reads both:
- ours (convert/writers.py) and upstream's convert_hf_to_gguf.py: CLIP's `mlp.fc1` (hidden -> n_ff)
  is `ffn_up`, `mlp.fc2` is `ffn_down`, and `general.type` is "mmproj".
- upstream's legacy `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py` (the files most
  people download as `mmproj-model-f16.gguf`): `fc1` is named `ffn_down` and `fc2` `ffn_up`, there is
  no `general.type`, no `clip.vision.feature_layer` (it stores only the layers LLaVA runs), and
  position and patch embeddings and the projector's matrices are F16 even in its F32 mode.
`ffn_swapped` records which one a file is, so that all backends agree. Like llama.cpp's clip.cpp
(clip_model_loader, `is_ffn_swapped`), the shapes decide: names are swapped when `ffn_down` takes
the CLIP width as input. When the MLP is square (n_ff == hidden) shapes cannot tell: clip.cpp then
always swaps (its test is true for every square file, even correctly named ones); we read the names
as written when the file says `general.type = mmproj` (the converters that name them right write
it) and swapped otherwise (upstream's legacy converter never writes it).

LLaVA-1.6 ("anyres") files carry the grid pinpoints, `mm_patch_merge_type = spatial_unpad` and the
`v.image_newline` vector: `info.anyres` is then an `AnyresSpec` (None for 1.5), and an image takes a
number of tokens that depends on its size (llava_local/image/anyres.py). Anyres files we cannot run
exactly as transformers' LlavaNext does (no newline vector, "flat" merging, pinpoints that are not
whole tiles) are refused here, before any backend loads them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from llava_local.errors import LlavaLocalError, ModelFilesError
from llava_local.formats.gguf_check import GGUFInfo, read_gguf_info
from llava_local.formats.gguf_names import (CLIP_BLOCK_TENSORS, KEY_FEATURE_LAYER, KEY_IMAGE_GRID_PINPOINTS,
                                            KEY_LLAVA_LOCAL_IMAGE_TOKENS, KEY_MM_PATCH_MERGE_TYPE, MERGE_FLAT,
                                            MERGE_SPATIAL_UNPAD, TN_IMAGE_NEWLINE, TN_IMAGE_NEWLINE_LEGACY,
                                            pinpoints_from_gguf)

log = logging.getLogger(__name__)

K = gguf.Keys
_FFN_UP = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_FFN_UP]        # "v.blk.{bid}.ffn_up"
_FFN_DOWN = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_FFN_DOWN]    # "v.blk.{bid}.ffn_down"
MAX_PINPOINT_TILES = 100    # tiles of one pinpoint (LLaVA-1.6: 4; OneVision-style grids: 36): bounds the batch
MAX_PINPOINTS = 256         # pinpoints in one file (LLaVA-1.6: 5)


@dataclass(frozen=True)
class AnyresSpec:
    """LLaVA-1.6 tiling: the resolutions an image may be resized and cut into tiles for."""
    grid_pinpoints: tuple[tuple[int, int], ...]   # (height, width) pixels, transformers' order, file order kept

    def pinpoints(self, tile: int, max_tiles: int | None = None) -> list[tuple[int, int]]:
        """The pinpoints of at most `max_tiles` tiles of `tile` pixels (all when None), in file order
        (the order breaks select_best_resolution's ties). LlavaLocalError when none is left."""
        if max_tiles is None:
            return list(self.grid_pinpoints)
        if max_tiles < 1:
            raise LlavaLocalError(f"image max tiles must be at least 1, got {max_tiles}")
        kept = [(h, w) for h, w in self.grid_pinpoints if (h // tile) * (w // tile) <= max_tiles]
        if not kept:
            fewest = min((h // tile) * (w // tile) for h, w in self.grid_pinpoints)
            raise LlavaLocalError(f"image max tiles {max_tiles} allows none of this model's grid pinpoints "
                                  f"(the smallest takes {fewest} tiles)")
        return kept


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
    n_ff: int = 0                   # CLIP MLP width, from the tensors (0: not checked)
    ffn_swapped: bool = False       # fc1 stored as ffn_down, fc2 as ffn_up (upstream's legacy converter)
    ffn_act: str = "quick_gelu"     # CLIP MLP activation as transformers names it (clip.use_gelu / use_silu)
    anyres: AnyresSpec | None = None  # None: LLaVA-1.5 (one fixed-size image)

    @property
    def image_tokens(self) -> int:
        """Tokens of ONE tile / one LLaVA-1.5 image (576 for ViT-L/14-336)."""
        return (self.image_size // self.patch_size) ** 2

    def max_image_tokens(self, max_tiles: int | None = None) -> int:
        """The most tokens any one image can take. 1.6: the base image + the largest allowed grid,
        not unpadded (an image of the pinpoint's own aspect), with one newline per feature row."""
        if self.anyres is None:
            return self.image_tokens
        g = self.image_size // self.patch_size        # feature rows (and columns) of one tile
        grids = [(h // self.image_size * g, w // self.image_size * g)
                 for h, w in self.anyres.pinpoints(self.image_size, max_tiles)]
        return self.image_tokens + max(rows * cols + rows for rows, cols in grids)

    def block_tensor_names(self, bid: int) -> dict[str, str]:
        """HF CLIP names of block `bid` (without .weight/.bias) -> the GGUF names this file uses."""
        names = {rel.format(bid=bid): g.format(bid=bid) for rel, g in CLIP_BLOCK_TENSORS.items()}
        if self.ffn_swapped:
            names[f"encoder.layers.{bid}.mlp.fc1"] = _FFN_DOWN.format(bid=bid)
            names[f"encoder.layers.{bid}.mlp.fc2"] = _FFN_UP.format(bid=bid)
        return names


def _ffn_layout(info: GGUFInfo, path: Path, hidden: int, n_layers: int) -> tuple[int, bool]:
    """(n_ff, swapped) from the FFN matrices of the first `n_layers` blocks (see the module docstring)."""
    n_ff, swapped = 0, False
    for bid in range(n_layers):
        up_name, down_name = (n.format(bid=bid) + ".weight" for n in (_FFN_UP, _FFN_DOWN))
        for name in (up_name, down_name):
            if name not in info.tensors:
                raise ModelFilesError(f"{path}: mmproj lacks tensor {name}")
        up, down = info.tensors[up_name], info.tensors[down_name]
        u, d = up.shape[:2], down.shape[:2]   # ggml order: (in, out)
        if len(up.shape) != 2 or len(down.shape) != 2 or u != d[::-1] or hidden not in u:
            raise ModelFilesError(f"{path}: block {bid} FFN shapes ffn_up {list(up.shape)}, ffn_down "
                                  f"{list(down.shape)} do not fit CLIP width {hidden} (ggml order)")
        if u[0] != u[1]:
            layer_swapped = u[1] == hidden          # ffn_up maps n_ff -> hidden: it is fc2
        else:                                   # square: the shapes cannot tell
            layer_swapped = info.get(K.General.TYPE) != gguf.GGUFType.MMPROJ
        layer_ff = u[0] if layer_swapped else u[1]
        if bid and (layer_ff, layer_swapped) != (n_ff, swapped):
            how = {True: "swapped", False: "as named"}
            raise ModelFilesError(f"{path}: block {bid} FFN ({layer_ff} wide, {how[layer_swapped]}) differs from "
                                  f"block 0 ({n_ff} wide, {how[swapped]})")
        n_ff, swapped = layer_ff, layer_swapped
    if swapped and n_ff == hidden:
        log.warning("%s: square CLIP MLP (width %d) in a file without general.type=mmproj: read as upstream's "
                    "legacy converter names it (fc1 = ffn_down), as llama.cpp does", path, hidden)
    return n_ff, swapped


def _ffn_act(info: GGUFInfo, path: Path) -> str:
    gelu, silu = bool(info.get(K.ClipVision.USE_GELU, False)), bool(info.get(K.ClipVision.USE_SILU, False))
    if gelu and silu:
        raise ModelFilesError(f"{path}: both {K.ClipVision.USE_GELU} and {K.ClipVision.USE_SILU} are set")
    # use_gelu is what the legacy converter writes for hidden_act == "gelu" (transformers: erf GELU)
    return "gelu" if gelu else "silu" if silu else "quick_gelu"


def mmproj_from_info(info: GGUFInfo) -> MmprojInfo:
    path = Path(info.path)
    if info.architecture != "clip":
        arch = info.architecture
        hint = " — this looks like an LLM GGUF, not an mmproj (vision) file" if arch and arch != "clip" else ""
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
    n_ff, swapped = _ffn_layout(info, path, m.hidden_size, m.feature_layer)
    return replace(m, n_ff=n_ff, ffn_swapped=swapped, ffn_act=_ffn_act(info, path),
                   anyres=_anyres(info, path, m.image_size, m.projection_dim))


def _anyres(info: GGUFInfo, path: Path, tile: int, n_embd: int) -> AnyresSpec | None:
    """The file's anyres tiling (None for LLaVA-1.5), refused unless we run it exactly as transformers."""
    flat = info.get(KEY_IMAGE_GRID_PINPOINTS) or []
    merge = info.get(KEY_MM_PATCH_MERGE_TYPE, MERGE_FLAT)
    if merge not in (MERGE_FLAT, MERGE_SPATIAL_UNPAD):
        raise ModelFilesError(f"{path}: {KEY_MM_PATCH_MERGE_TYPE} {merge!r} unsupported "
                              f"(llava-local runs {MERGE_FLAT!r} for LLaVA-1.5 and {MERGE_SPATIAL_UNPAD!r} for 1.6)")
    if not flat:
        if merge == MERGE_SPATIAL_UNPAD:
            raise ModelFilesError(f"{path}: {KEY_MM_PATCH_MERGE_TYPE} is {merge!r} but the file has no "
                                  f"{KEY_IMAGE_GRID_PINPOINTS}: cannot tile images")
        return None
    if merge != MERGE_SPATIAL_UNPAD:
        raise ModelFilesError(f"{path}: {KEY_IMAGE_GRID_PINPOINTS} with {KEY_MM_PATCH_MERGE_TYPE} {merge!r}: "
                              f"llava-local runs LLaVA-1.6 tiling only with {MERGE_SPATIAL_UNPAD!r} merging "
                              "(transformers' LlavaNext)")
    if not isinstance(flat, list) or len(flat) % 2 or len(flat) > 2 * MAX_PINPOINTS \
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
        raise ModelFilesError(f"{path}: {KEY_IMAGE_GRID_PINPOINTS} must be an even-length integer array of at most "
                              f"{MAX_PINPOINTS} pairs, got {flat[:8] if isinstance(flat, list) else flat!r}")
    pinpoints = pinpoints_from_gguf(flat)   # stored as clip.cpp reads them: (width, height) pairs
    for h, w in pinpoints:
        if h <= 0 or w <= 0 or h % tile or w % tile or (h // tile) * (w // tile) > MAX_PINPOINT_TILES:
            raise ModelFilesError(f"{path}: grid pinpoint {h}x{w} (height x width) is not a grid of at most "
                                  f"{MAX_PINPOINT_TILES} whole {tile}-px tiles")
    name = image_newline_name(info)
    if name is None:
        raise ModelFilesError(f"{path}: a LLaVA-1.6 mmproj ({KEY_IMAGE_GRID_PINPOINTS}) without the {TN_IMAGE_NEWLINE} "
                              "tensor: re-convert it with `llava-local convert`")
    if tuple(info.tensors[name].shape) != (n_embd,):
        raise ModelFilesError(f"{path}: {name} has shape {list(info.tensors[name].shape)}, expected [{n_embd}] "
                              "(the projector's width)")
    return AnyresSpec(pinpoints)


def image_newline_name(info: GGUFInfo) -> str | None:
    """The newline vector's tensor name in this file: ours and upstream's, else the legacy converter's."""
    return next((n for n in (TN_IMAGE_NEWLINE, TN_IMAGE_NEWLINE_LEGACY) if n in info.tensors), None)


def read_mmproj(path: str | Path) -> MmprojInfo:
    return mmproj_from_info(read_gguf_info(path))


def read_image_newline(mmproj: MmprojInfo) -> np.ndarray:
    """The mmproj's `v.image_newline` vector (`model.image_newline` in legacy files), (n_embd,) float32,
    read from the file at each call."""
    name = image_newline_name(mmproj.gguf)
    if name is None:
        raise ModelFilesError(f"{mmproj.path}: no {TN_IMAGE_NEWLINE} tensor")
    t = mmproj.gguf.tensors[name]
    with open(mmproj.path, "rb") as f:
        f.seek(mmproj.gguf.data_offset + t.offset)
        raw = np.frombuffer(f.read(t.nbytes), dtype=np.uint8)
    if raw.size != t.nbytes:
        raise ModelFilesError(f"{mmproj.path}: {name} is truncated")
    vec = np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.ggml_type)), np.float32).reshape(-1)
    if vec.shape != (mmproj.projection_dim,):
        raise ModelFilesError(f"{mmproj.path}: {name} has {vec.size} values, expected {mmproj.projection_dim}")
    return vec
