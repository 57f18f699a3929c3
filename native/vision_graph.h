// The LLaVA vision graph for a batch of B images: CLIP ViT (CLS first) -> feature layer -> drop
// CLS -> projector (Linear, erf GELU, Linear). Internal to llava_vision.
#pragma once

#include "vision_model.h"

namespace llava_vision {

struct vision_graph {
    ggml_cgraph * gf = nullptr;
    ggml_tensor * pixels = nullptr;  // input  (S, S, 3, B) F32 = numpy (B, 3, S, S)
    ggml_tensor * out = nullptr;     // output (E, N, B)    F32 = numpy (B, N, E)
};

// Most nodes the graph has (~36 per layer); the scheduler needs room for these plus the weights.
int max_graph_nodes(const hparams & hp);

// Bytes of the no_alloc ggml context that build_graph needs for a model of this depth.
size_t graph_meta_size(const hparams & hp);

// flash_attn: ggml_flash_attn_ext with K/V of `kv_type` instead of softmax(K^T Q) V in F32.
vision_graph build_graph(ggml_context * ctx0, const model & m, int n_images, bool flash_attn, ggml_type kv_type);

}  // namespace llava_vision
