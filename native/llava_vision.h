// llava_vision: LLaVA's CLIP vision tower + projector as one ggml graph (CPU, CUDA, Metal).
//
// Exact where llama.cpp's own LLaVA graph is not: the CLS token comes *first* with position 0
// (upstream #25814 appends it after the patches), the feature layer's count of layers is run
// (clip.vision.feature_layer), CLIP's MLP uses exact quick-GELU and the projector exact erf GELU.
// A batch of B images is one graph, so weights are read once per batch.
//
//     struct llava_vision_params p = llava_vision_default_params();
//     char err[512];
//     struct llava_vision_context * ctx = llava_vision_init_from_file("mmproj-F16.gguf", p, err, sizeof err);
//     if (!ctx) { fprintf(stderr, "%s\n", err); return 1; }
//     // pixels: (n, 3, S, S) float32, already normalised (llava_local/preprocess.py)
//     // out:    (n, n_tokens, n_embd) float32
//     int32_t rc = llava_vision_encode_batch(ctx, pixels, n, out, err, sizeof err);
//     llava_vision_free(ctx);
//
// Bad input (a malformed GGUF, a wrong batch size, non-finite pixels) returns an error, never aborts.
// One context may be used from several threads: calls on it are serialised.

#pragma once

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#    define LLAVA_VISION_API __declspec(dllexport)
#else
#    define LLAVA_VISION_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum llava_vision_status {
    LLAVA_VISION_OK               = 0,
    LLAVA_VISION_ERR_ARGUMENT     = 1,  // a null pointer, a batch size outside 1..max_batch, non-finite pixels
    LLAVA_VISION_ERR_FILE         = 2,  // cannot open or parse the file, or its tensor data is truncated
    LLAVA_VISION_ERR_MODEL        = 3,  // a key or tensor is missing or has the wrong type or shape
    LLAVA_VISION_ERR_BACKEND      = 4,  // no ggml device, or a buffer could not be allocated
    LLAVA_VISION_ERR_COMPUTE      = 5,  // the graph failed to run or produced non-finite values
};

struct llava_vision_params {
    int32_t n_threads;   // CPU threads; <= 0: all hardware threads
    int32_t use_gpu;     // non-zero: the first GPU device ggml has (CUDA, Metal, Vulkan...), else the CPU
    int32_t max_batch;   // most images per encode call: bounds the compute buffer (attention is O(B*T^2))
    int32_t flash_attn;  // fused attention (ggml_flash_attn_ext): -1 auto = on for the CPU (F32 K/V: as exact
                         // as softmax(QK^T)V, and faster there), off on a GPU; 0 off; 1 on (F16 K/V on a GPU)
    int32_t cpu_f32_weights;  // non-zero: on the CPU, F16/BF16 matrices are widened to F32 at load: twice the
                              // weight memory, faster matmuls on x86 (no per-tile conversion), and activations
                              // no longer rounded to F16/BF16 before each matmul. Figures: native/README.md
};

struct llava_vision_context;

LLAVA_VISION_API struct llava_vision_params llava_vision_default_params(void);

// Returns NULL on failure, with a message in err_buf (if given) and the reason in
// llava_vision_init_status(). Every key and tensor is checked against the geometry before anything
// is allocated.
LLAVA_VISION_API struct llava_vision_context * llava_vision_init_from_file(
        const char * path, struct llava_vision_params params, char * err_buf, size_t err_len);

// The llava_vision_status of this thread's last llava_vision_init_from_file call.
LLAVA_VISION_API int32_t llava_vision_init_status(void);

// pixels: n_images x 3 x image_size x image_size floats; out: n_images x n_tokens x n_embd floats.
// Returns LLAVA_VISION_OK or an llava_vision_status, with a message in err_buf (if given).
LLAVA_VISION_API int32_t llava_vision_encode_batch(
        struct llava_vision_context * ctx, const float * pixels, int32_t n_images, float * out,
        char * err_buf, size_t err_len);

LLAVA_VISION_API void llava_vision_free(struct llava_vision_context * ctx);

LLAVA_VISION_API int32_t llava_vision_n_tokens   (const struct llava_vision_context * ctx);  // patches per image (CLS dropped)
LLAVA_VISION_API int32_t llava_vision_n_embd     (const struct llava_vision_context * ctx);  // projector output width
LLAVA_VISION_API int32_t llava_vision_image_size (const struct llava_vision_context * ctx);
LLAVA_VISION_API int32_t llava_vision_n_layers   (const struct llava_vision_context * ctx);  // CLIP layers run
LLAVA_VISION_API int32_t llava_vision_max_batch  (const struct llava_vision_context * ctx);
LLAVA_VISION_API const char * llava_vision_backend_name(const struct llava_vision_context * ctx);  // "CPU", "CUDA0", "MTL0"...
LLAVA_VISION_API const char * llava_vision_weight_type (const struct llava_vision_context * ctx);  // attention weights in memory: "f32"...
LLAVA_VISION_API const char * llava_vision_file_type   (const struct llava_vision_context * ctx);  // ... and in the file: "f16"...
LLAVA_VISION_API int32_t      llava_vision_flash_attn  (const struct llava_vision_context * ctx);  // 1 if the graph uses it

#ifdef __cplusplus
}
#endif
