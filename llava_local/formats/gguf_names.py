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
KEY_LLAVA_LOCAL_IMAGE_TOKENS = "llava_local.image_tokens"     # our own: tokens per image


def llm_tensor_map(n_blocks: int) -> gguf.TensorNameMap:
    """HF Llama names ("model.layers.0.self_attn.q_proj") -> GGUF names ("blk.0.attn_q")."""
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
