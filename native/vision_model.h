// The LLaVA vision model as read from an mmproj GGUF: hyper-parameters, weights, and the loader
// that validates every key and tensor before anything is allocated. Internal to llava_vision.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"

namespace llava_vision {

// CLIP MLP activations, as transformers' hidden_act: quick_gelu (OpenAI CLIP, LLaVA-1.5), gelu (erf), silu
enum class ffn_op { gelu_quick, gelu_erf, silu };

struct hparams {
    int32_t image_size = 0;   // S: pixels per side (336 for LLaVA-1.5)
    int32_t patch_size = 0;   // P: 14
    int32_t n_embd     = 0;   // D: CLIP width (1024)
    int32_t n_ff       = 0;   // CLIP MLP width (4096)
    int32_t n_head     = 0;   // 16
    int32_t n_layer    = 0;   // layers run: LLaVA's feature layer (23 of ViT-L's 24 for "layer -2")
    int32_t n_mm_ff    = 0;   // projector hidden width (mm.0 output)
    int32_t n_out      = 0;   // projector output width = the LLM's embedding width
    float   eps        = 1e-5f;
    // upstream's legacy converter (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py) names
    // CLIP's fc1 "ffn_down" and fc2 "ffn_up"; true when this file does (see read_ffn_layout)
    bool    ffn_swapped = false;
    ffn_op  ffn        = ffn_op::gelu_quick;   // CLIP's MLP activation (clip.use_gelu / clip.use_silu)

    int32_t n_side()    const { return image_size / patch_size; }
    int32_t n_patches() const { return n_side() * n_side(); }
    int32_t n_pos()     const { return n_patches() + 1; }     // CLS + patches
    int32_t d_head()    const { return n_embd / n_head; }
};

struct layer_weights {
    ggml_tensor * ln1_w = nullptr, * ln1_b = nullptr;
    ggml_tensor * q_w = nullptr, * q_b = nullptr;
    ggml_tensor * k_w = nullptr, * k_b = nullptr;
    ggml_tensor * v_w = nullptr, * v_b = nullptr;
    ggml_tensor * o_w = nullptr, * o_b = nullptr;
    ggml_tensor * ln2_w = nullptr, * ln2_b = nullptr;
    ggml_tensor * up_w = nullptr, * up_b = nullptr;       // CLIP's fc1 (D -> F), whatever the file calls it
    ggml_tensor * down_w = nullptr, * down_b = nullptr;   // CLIP's fc2 (F -> D)
};

struct model {
    hparams hp;
    ggml_tensor * class_embd = nullptr;   // (D)            F32
    ggml_tensor * patch_w    = nullptr;   // (P, P, 3, D)   F32 (see load: small, and im2col is F32)
    ggml_tensor * pos_embd   = nullptr;   // (D, 1+N)       F32
    ggml_tensor * pre_ln_w = nullptr, * pre_ln_b = nullptr;
    std::vector<layer_weights> layers;
    ggml_tensor * mm0_w = nullptr, * mm0_b = nullptr;   // (D, H) and (H)
    ggml_tensor * mm2_w = nullptr, * mm2_b = nullptr;   // (H, E) and (E)

    ggml_context * ctx = nullptr;            // tensor metadata
    ggml_backend_buffer_t buffer = nullptr;  // tensor data, on the compute device
    ggml_type file_type = GGML_TYPE_F32;     // of the attention weights in the file, for reporting
    ggml_type weight_type = GGML_TYPE_F32;   // of the attention weights in memory

    model() = default;
    model(const model &) = delete;
    model & operator=(const model &) = delete;
    ~model();
};

// Reads and validates `path`, allocates the weights in `buft` and uploads them; with `f32_matmul`
// F16/BF16 matrices are widened to F32 (quantized ones are kept).
// Returns an llava_vision_status; on failure `err` says what was expected and what was found.
int32_t load_model(const char * path, ggml_backend_buffer_type_t buft, bool f32_matmul, model & m, std::string & err);

}  // namespace llava_vision
