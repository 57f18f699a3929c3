"""Name tables: checkpoint tensor names -> llama.cpp GGUF names, and the GGUF keys we write.

One source name per line, grouped by checkpoint family. Block-level names use "{bid}".
The LLM side uses gguf-py's own `TensorNameMap` for the llama architecture.
"""
from __future__ import annotations

import gguf

# --- vision tower (CLIP ViT), names relative to the CLIP `vision_model.` prefix ---
# The same relative names appear in HF CLIPVisionModel / CLIPModel dirs (prefix "vision_model."),
# llava-hf checkpoints ("vision_tower.vision_model." or "model.vision_tower.vision_model.").
_V = gguf.TENSOR_NAMES
CLIP_TENSORS = {
    "embeddings.class_embedding": _V[gguf.MODEL_TENSOR.V_ENC_EMBD_CLS],                  # (D,)
    "embeddings.patch_embedding.weight": _V[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight",  # (D, 3, P, P)
    "embeddings.position_embedding.weight": _V[gguf.MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight",  # (1+N, D)
    "pre_layrnorm.weight": _V[gguf.MODEL_TENSOR.V_PRE_NORM] + ".weight",   # sic: "layrnorm" in HF CLIP
    "pre_layrnorm.bias": _V[gguf.MODEL_TENSOR.V_PRE_NORM] + ".bias",
}
CLIP_BLOCK_TENSORS = {
    "encoder.layers.{bid}.self_attn.q_proj": _V[gguf.MODEL_TENSOR.V_ENC_ATTN_Q],
    "encoder.layers.{bid}.self_attn.k_proj": _V[gguf.MODEL_TENSOR.V_ENC_ATTN_K],
    "encoder.layers.{bid}.self_attn.v_proj": _V[gguf.MODEL_TENSOR.V_ENC_ATTN_V],
    "encoder.layers.{bid}.self_attn.out_proj": _V[gguf.MODEL_TENSOR.V_ENC_ATTN_O],
    "encoder.layers.{bid}.layer_norm1": _V[gguf.MODEL_TENSOR.V_ENC_INPUT_NORM],
    "encoder.layers.{bid}.layer_norm2": _V[gguf.MODEL_TENSOR.V_ENC_POST_ATTN_NORM],
    "encoder.layers.{bid}.mlp.fc1": _V[gguf.MODEL_TENSOR.V_ENC_FFN_UP],
    "encoder.layers.{bid}.mlp.fc2": _V[gguf.MODEL_TENSOR.V_ENC_FFN_DOWN],
}
# post_layernorm only feeds CLIP's pooled output, which LLaVA never uses: not written.
CLIP_UNUSED = ("post_layernorm.weight", "post_layernorm.bias")

# --- projector: LLaVA-1.5 mlp2x_gelu = Linear, GELU, Linear ---
_MM = _V[gguf.MODEL_TENSOR.V_MMPROJ]  # "mm.{bid}"
PROJECTOR_TENSORS = {
    "linear_1": _MM.format(bid=0),      # llava-hf: multi_modal_projector.linear_1
    "linear_2": _MM.format(bid=2),      # llava-hf: multi_modal_projector.linear_2
    "0": _MM.format(bid=0),             # original LLaVA: model.mm_projector.0
    "2": _MM.format(bid=2),             # original LLaVA: model.mm_projector.2
}

# --- GGUF keys ---
K = gguf.Keys
KEY_FEATURE_LAYER = "clip.vision.feature_layer"  # read by llama.cpp clip.cpp; not in gguf-py's Keys
KEY_LLAVA_LOCAL_TEMPLATE = "llava_local.chat_template_name"   # our own: the named template
KEY_LLAVA_LOCAL_IMAGE_TOKENS = "llava_local.image_tokens"     # our own: tokens per image (per tile for 1.6)

# --- LLaVA-1.6 ("anyres"), upstream's names (tools/mtmd/clip-impl.h; gguf-py has no Keys entry yet) ---
# Pair order: (WIDTH, HEIGHT). clip.cpp reads the flat array two at a time into `clip_image_size
# {width, height}`, and upstream's HF converter (conversion/granite.py, a LLaVA-NeXT model) flips
# transformers' (height, width) pairs to write it. The legacy converter copies the LLaVA repo's
# config list verbatim, which the LLaVA repo itself reads as (width, height) too. So we write
# transformers' (h, w) as (w, h), and readers flip every pair back to (h, w).
KEY_IMAGE_GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"   # flat int array: w0, h0, w1, h1, ...
KEY_MM_PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"     # "spatial_unpad" for 1.6 ("flat" if absent)
TN_IMAGE_NEWLINE = _V[gguf.MODEL_TENSOR.V_ENC_EMBD_IMGNL]       # "v.image_newline", (n_embd,) F32
# upstream's legacy converter (llava_surgery_v2.py + convert_image_encoder_to_gguf.py) keeps the LLaVA
# repo's name for the newline; current clip.cpp does not load it under that name (its graph never uses it)
TN_IMAGE_NEWLINE_LEGACY = "model.image_newline"
# mm_patch_merge_type values (clip.cpp's and the LLaVA repo's): LLaVA-1.5 "flat", LLaVA-1.6 "spatial_unpad"
MERGE_FLAT, MERGE_SPATIAL_UNPAD = "flat", "spatial_unpad"


def pinpoints_to_gguf(pinpoints_hw) -> list[int]:
    """transformers' ((h, w), ...) -> the flat (w, h, w, h, ...) array clip.cpp reads."""
    return [int(v) for h, w in pinpoints_hw for v in (w, h)]


def pinpoints_from_gguf(flat: list[int]) -> tuple[tuple[int, int], ...]:
    """The inverse of pinpoints_to_gguf: the flat (w, h, ...) array -> ((h, w), ...), transformers' order."""
    return tuple((int(h), int(w)) for w, h in zip(flat[0::2], flat[1::2]))


def llm_tensor_map(n_blocks: int) -> gguf.TensorNameMap:
    """HF Llama names ("model.layers.0.self_attn.q_proj") -> GGUF names ("blk.0.attn_q")."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
