// The graph itself. Shapes are in ggml order (innermost first): D = CLIP width, T = 1 + N
// positions, B = images, H = heads, dh = D / H, F = CLIP MLP width, E = projector output width.
//
// Where it departs from llama.cpp's tools/mtmd/models/llava.cpp, on purpose:
// - CLS is concatenated *before* the patches, so patch i gets position embedding i + 1 as in
//   CLIP; upstream appends CLS last (#25814), shifting every patch's position.
// - quick-GELU x * sigmoid(1.702 x) is computed as silu(1.702 x) / 1.702 in F32: ggml's gelu_quick
//   reads an FP16 lookup table on CPU, its sigmoid is a scalar loop, its silu is vectorised.
//   A file with clip.use_gelu gets erf GELU (transformers' "gelu"); upstream runs the tanh one.
// - the projector uses exact erf GELU (ggml_gelu_erf), as LLaVA's nn.GELU() does.
// - the batch is one graph: every weight matrix multiplies B * T rows at once.
#include "vision_graph.h"

#include <cmath>

namespace llava_vision {

namespace {

constexpr float QUICK_GELU_COEF = 1.702f;  // CLIP's quick_gelu: x * sigmoid(1.702 x)

ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    x = ggml_norm(ctx, x, eps);
    return ggml_add(ctx, ggml_mul(ctx, x, w), b);
}

ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b) {
    return ggml_add(ctx, ggml_mul_mat(ctx, w, x), b);
}

ggml_tensor * attention(ggml_context * ctx, const hparams & hp, const layer_weights & L, ggml_tensor * x,
                        int B, bool flash_attn, ggml_type kv_type) {
    const int T = hp.n_pos(), H = hp.n_head, dh = hp.d_head(), D = hp.n_embd;
    const float scale = 1.0f / std::sqrt((float) dh);

    ggml_tensor * q = ggml_reshape_4d(ctx, linear(ctx, x, L.q_w, L.q_b), dh, H, T, B);
    ggml_tensor * k = ggml_reshape_4d(ctx, linear(ctx, x, L.k_w, L.k_b), dh, H, T, B);
    ggml_tensor * v = ggml_reshape_4d(ctx, linear(ctx, x, L.v_w, L.v_b), dh, H, T, B);
    q = ggml_permute(ctx, q, 0, 2, 1, 3);                                   // (dh, T, H, B)
    k = ggml_permute(ctx, k, 0, 2, 1, 3);                                   // (dh, T, H, B)

    ggml_tensor * cur;
    if (flash_attn) {
        v = ggml_permute(ctx, v, 0, 2, 1, 3);                               // (dh, T, H, B)
        if (kv_type != GGML_TYPE_F32) {
            k = ggml_cast(ctx, k, kv_type);
            v = ggml_cast(ctx, v, kv_type);
        }
        cur = ggml_flash_attn_ext(ctx, q, k, v, nullptr, scale, 0.0f, 0.0f);  // (dh, H, T, B)
        ggml_prec_set_acc(cur, GGML_PREC_F32);
        cur = ggml_reshape_3d(ctx, cur, D, T, B);
    } else {
        v = ggml_cont(ctx, ggml_permute(ctx, v, 1, 2, 0, 3));               // (T, dh, H, B)
        ggml_tensor * kq = ggml_mul_mat(ctx, k, q);                         // (T_k, T_q, H, B)
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        kq = ggml_soft_max_ext(ctx, kq, nullptr, scale, 0.0f);
        cur = ggml_mul_mat(ctx, v, kq);                                     // (dh, T_q, H, B)
        cur = ggml_permute(ctx, cur, 0, 2, 1, 3);                           // (dh, H, T, B)
        cur = ggml_cont_3d(ctx, cur, D, T, B);
    }
    return linear(ctx, cur, L.o_w, L.o_b);                                  // (D, T, B)
}

ggml_tensor * mlp(ggml_context * ctx, const hparams & hp, const layer_weights & L, ggml_tensor * x) {
    ggml_tensor * h = linear(ctx, x, L.up_w, L.up_b);                       // (F, T, B)
    switch (hp.ffn) {
        case ffn_op::gelu_quick:
            h = ggml_silu(ctx, ggml_scale_inplace(ctx, h, QUICK_GELU_COEF));
            h = ggml_scale_inplace(ctx, h, 1.0f / QUICK_GELU_COEF);
            break;
        case ffn_op::gelu_erf: h = ggml_gelu_erf(ctx, h); break;   // transformers' "gelu" (clip.cpp: tanh)
        case ffn_op::silu:     h = ggml_silu(ctx, h); break;
    }
    return linear(ctx, h, L.down_w, L.down_b);                              // (D, T, B)
}

}  // namespace

int max_graph_nodes(const hparams & hp) {
    return 64 * hp.n_layer + 256;
}

size_t graph_meta_size(const hparams & hp) {
    const size_t n = (size_t) max_graph_nodes(hp);
    return ggml_tensor_overhead() * n + ggml_graph_overhead_custom(n, false);
}

vision_graph build_graph(ggml_context * ctx, const model & m, int B, bool flash_attn, ggml_type kv_type) {
    const hparams & hp = m.hp;
    const int S = hp.image_size, P = hp.patch_size, D = hp.n_embd, N = hp.n_patches();
    vision_graph g;
    g.gf = ggml_new_graph_custom(ctx, max_graph_nodes(hp), false);

    g.pixels = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, S, 3, B);
    ggml_set_name(g.pixels, "pixels");
    ggml_set_input(g.pixels);

    // patch embedding: a stride-P convolution without bias = im2col (kept in F32) + one matmul
    ggml_tensor * cols = ggml_im2col(ctx, m.patch_w, g.pixels, P, P, 0, 0, 1, 1, true, GGML_TYPE_F32);
    cols = ggml_reshape_2d(ctx, cols, 3 * P * P, N * B);                    // (3*P*P, N*B), row-major patches
    ggml_tensor * kernel = ggml_reshape_2d(ctx, m.patch_w, P * P * 3, D);
    ggml_tensor * x = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, kernel, cols), D, N, B);

    // CLS first (position 0), then the patches: CLIPVisionEmbeddings' order
    ggml_tensor * cls = ggml_repeat_4d(ctx, m.class_embd, D, 1, B, 1);     // (D, 1, B)
    x = ggml_concat(ctx, cls, x, 1);                                        // (D, T, B)
    x = ggml_add(ctx, x, m.pos_embd);
    x = layer_norm(ctx, x, m.pre_ln_w, m.pre_ln_b, hp.eps);                 // CLIP's pre_layrnorm

    for (int il = 0; il < hp.n_layer; ++il) {
        const layer_weights & L = m.layers[il];
        x = ggml_add(ctx, x, attention(ctx, hp, L, layer_norm(ctx, x, L.ln1_w, L.ln1_b, hp.eps), B, flash_attn, kv_type));
        x = ggml_add(ctx, x, mlp(ctx, hp, L, layer_norm(ctx, x, L.ln2_w, L.ln2_b, hp.eps)));
    }

    // LLaVA's "default" feature selection drops CLS; no post-layernorm (it only feeds CLIP's pooler)
    ggml_tensor * feat = ggml_view_3d(ctx, x, D, N, B, x->nb[1], x->nb[2], x->nb[1]);
    feat = ggml_cont(ctx, feat);                                            // (D, N, B)
    ggml_tensor * h = ggml_gelu_erf(ctx, linear(ctx, feat, m.mm0_w, m.mm0_b));  // (H_mm, N, B)
    g.out = linear(ctx, h, m.mm2_w, m.mm2_b);                               // (E, N, B)
    ggml_set_name(g.out, "image_embd");
    ggml_set_output(g.out);
    ggml_build_forward_expand(g.gf, g.out);
    return g;
}

}  // namespace llava_vision
