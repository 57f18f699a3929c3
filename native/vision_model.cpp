// Loading an mmproj GGUF (the clip.* format convert/writers.py writes, or upstream's legacy LLaVA
// converter with its swapped FFN names) into device tensors.
//
// Everything untrusted is checked before any allocation: key types (gguf's getters assert on a
// wrong type, so they are only called after gguf_get_kv_type), geometry limits, every tensor's
// type and exact shape, and that its data lies inside the file (gguf does not read the data
// section when asked for metadata only, so a truncated file would otherwise load garbage).
#include "vision_model.h"

#include "ggml-alloc.h"
#include "gguf.h"
#include "llava_vision.h"

#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <memory>

namespace llava_vision {

namespace {

// Bounds far above any CLIP in use (ViT-bigG: width 1664, 48 layers; 1+24*24 positions at 336 px),
// but small enough that graph sizes computed from them cannot overflow.
constexpr int64_t MAX_IMAGE_SIZE = 4096;
constexpr int64_t MAX_POSITIONS  = 16384;
constexpr int64_t MAX_WIDTH      = 65536;
constexpr int64_t MAX_LAYERS     = 1024;

std::string fmt(const char * f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char * f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

struct gguf_deleter { void operator()(gguf_context * g) const { gguf_free(g); } };
struct file_closer  { void operator()(FILE * f) const { fclose(f); } };
using gguf_ptr = std::unique_ptr<gguf_context, gguf_deleter>;
using file_ptr = std::unique_ptr<FILE, file_closer>;

bool is_int_type(gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
            return true;
        default:
            return false;
    }
}

int64_t int_at(gguf_type t, const void * p) {
    switch (t) {
        case GGUF_TYPE_UINT8:  return *(const uint8_t  *) p;
        case GGUF_TYPE_INT8:   return *(const int8_t   *) p;
        case GGUF_TYPE_UINT16: return *(const uint16_t *) p;
        case GGUF_TYPE_INT16:  return *(const int16_t  *) p;
        case GGUF_TYPE_UINT32: return *(const uint32_t *) p;
        case GGUF_TYPE_INT32:  return *(const int32_t  *) p;
        case GGUF_TYPE_UINT64: { uint64_t v = *(const uint64_t *) p; return v > INT64_MAX ? INT64_MAX : (int64_t) v; }
        case GGUF_TYPE_INT64:  return *(const int64_t  *) p;
        default:               return 0;
    }
}

// Typed, checked access to the metadata.
struct meta {
    const gguf_context * g;
    std::string & err;

    int64_t find(const char * key) const { return gguf_find_key(g, key); }

    bool get_str(const char * key, std::string & out) const {
        const int64_t id = find(key);
        if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) {
            err = fmt("missing string key %s", key);
            return false;
        }
        out = gguf_get_val_str(g, id);
        return true;
    }

    bool get_int(const char * key, int64_t lo, int64_t hi, int32_t & out) const {
        const int64_t id = find(key);
        if (id < 0) {
            err = fmt("missing key %s", key);
            return false;
        }
        const gguf_type t = gguf_get_kv_type(g, id);
        if (!is_int_type(t)) {
            err = fmt("key %s has type %s, expected an integer", key, gguf_type_name(t));
            return false;
        }
        const int64_t v = int_at(t, gguf_get_val_data(g, id));
        if (v < lo || v > hi) {
            err = fmt("key %s = %" PRId64 " outside %" PRId64 "..%" PRId64, key, v, lo, hi);
            return false;
        }
        out = (int32_t) v;
        return true;
    }

    // A bool key that may be absent (then `out` keeps its default).
    bool get_opt_bool(const char * key, bool & out) const {
        const int64_t id = find(key);
        if (id < 0) {
            return true;
        }
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_BOOL) {
            err = fmt("key %s has type %s, expected a bool", key, gguf_type_name(gguf_get_kv_type(g, id)));
            return false;
        }
        out = gguf_get_val_bool(g, id);
        return true;
    }

    // A float key that may be absent (then `out` keeps its default).
    bool get_opt_float(const char * key, float & out) const {
        const int64_t id = find(key);
        if (id < 0) {
            return true;
        }
        const gguf_type t = gguf_get_kv_type(g, id);
        if (t == GGUF_TYPE_FLOAT32) {
            out = gguf_get_val_f32(g, id);
        } else if (t == GGUF_TYPE_FLOAT64) {
            out = (float) gguf_get_val_f64(g, id);
        } else {
            err = fmt("key %s has type %s, expected a float", key, gguf_type_name(t));
            return false;
        }
        if (!(out > 0.0f && out < 1.0f)) {
            err = fmt("key %s = %g is not a layer-norm epsilon", key, (double) out);
            return false;
        }
        return true;
    }
};

// How a tensor is stored on the device.
enum class role {
    f32,     // small (norms, biases, embeddings) or the patch kernel: converted to F32 at load
    matmul,  // a large matrix: kept in its stored type (F32, F16, BF16, Q8_0...)
};

struct tensor_spec {
    std::string name;
    int64_t ne[GGML_MAX_DIMS];
    int n_dims;
    role r;
    ggml_tensor ** dst;
    int64_t gguf_id = -1;
};

// Returns an llava_vision_status.
int32_t check_tensor(const gguf_context * g, size_t file_size, tensor_spec & s, std::string & err) {
    s.gguf_id = gguf_find_tensor(g, s.name.c_str());
    if (s.gguf_id < 0) {
        err = fmt("missing tensor %s", s.name.c_str());
        return LLAVA_VISION_ERR_MODEL;
    }
    const int64_t * ne = gguf_get_tensor_ne(g, s.gguf_id);
    bool same = true;
    for (int i = 0; i < GGML_MAX_DIMS; ++i) {
        same = same && ne[i] == (i < s.n_dims ? s.ne[i] : 1);
    }
    if (!same) {
        err = fmt("tensor %s has shape [%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64 "], expected [%" PRId64
                  ", %" PRId64 ", %" PRId64 ", %" PRId64 "] (ggml order)", s.name.c_str(), ne[0], ne[1], ne[2], ne[3],
                  s.ne[0], s.n_dims > 1 ? s.ne[1] : 1, s.n_dims > 2 ? s.ne[2] : 1, s.n_dims > 3 ? s.ne[3] : 1);
        return LLAVA_VISION_ERR_MODEL;
    }
    const ggml_type t = gguf_get_tensor_type(g, s.gguf_id);
    const bool float_like = t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16;
    const bool usable = float_like || (ggml_is_quantized(t) && ggml_get_type_traits(t)->to_float != nullptr);
    if (!usable) {
        err = fmt("tensor %s has type %s, which this encoder cannot use", s.name.c_str(), ggml_type_name(t));
        return LLAVA_VISION_ERR_MODEL;
    }
    const size_t begin = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, s.gguf_id);
    const size_t size = gguf_get_tensor_size(g, s.gguf_id);
    if (begin < gguf_get_data_offset(g) || begin > file_size || size > file_size - begin) {
        err = fmt("tensor %s: data [%zu, +%zu) lies past the end of the file (%zu bytes): truncated?",
                  s.name.c_str(), begin, size, file_size);
        return LLAVA_VISION_ERR_FILE;
    }
    return LLAVA_VISION_OK;
}

bool read_hparams(const gguf_context * g, hparams & hp, std::string & err) {
    meta m{g, err};
    std::string s;
    if (!m.get_str("general.architecture", s)) return false;
    if (s != "clip") {
        err = fmt("general.architecture is '%s', expected 'clip' (an mmproj file)", s.c_str());
        return false;
    }
    if (!m.get_str("clip.projector_type", s)) return false;
    if (s != "mlp") {
        err = fmt("clip.projector_type is '%s'; only LLaVA-1.5's 'mlp' is supported", s.c_str());
        return false;
    }
    if (const int64_t id = m.find("clip.has_vision_encoder");
        id >= 0 && (gguf_get_kv_type(g, id) != GGUF_TYPE_BOOL || !gguf_get_val_bool(g, id))) {
        err = "clip.has_vision_encoder is not true: this mmproj has no vision tower";
        return false;
    }
    // LLaVA-1.6 ("anyres"): this encoder runs each tile (and the base image) like a 1.5 image; the
    // tiling, unpadding and image_newline rows are the caller's (llava_local/image/anyres.py). Only the
    // variant transformers runs is accepted: pinpoints + spatial_unpad + the v.image_newline tensor.
    bool anyres = false;
    if (const int64_t id = m.find("clip.vision.image_grid_pinpoints"); id >= 0) {
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY) {
            err = "clip.vision.image_grid_pinpoints is not an array";
            return false;
        }
        anyres = gguf_get_arr_n(g, id) > 0;
    }
    const char * merge = "flat";
    if (const int64_t id = m.find("clip.vision.mm_patch_merge_type"); id >= 0) {
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) {
            err = "clip.vision.mm_patch_merge_type is not a string";
            return false;
        }
        merge = gguf_get_val_str(g, id);
    }
    if (strcmp(merge, anyres ? "spatial_unpad" : "flat") != 0) {
        err = fmt("clip.vision.mm_patch_merge_type '%s' %s grid pinpoints: not a LLaVA-1.5 ('flat') or LLaVA-1.6 "
                  "('spatial_unpad' with pinpoints) mmproj this encoder runs", merge, anyres ? "with" : "without");
        return false;
    }
    // the newline vector: ours and upstream's name, or the legacy converter's (llava_surgery_v2.py)
    if (anyres && gguf_find_tensor(g, "v.image_newline") < 0 && gguf_find_tensor(g, "model.image_newline") < 0) {
        err = "a LLaVA-1.6 (anyres) mmproj without the v.image_newline tensor: re-convert it with llava-local convert";
        return false;
    }
    // clip.cpp's reading: use_gelu (what the legacy converter writes for hidden_act "gelu"), use_silu,
    // else quick-GELU. transformers' "gelu" is the erf one, so that is what runs here.
    bool use_gelu = false, use_silu = false;
    if (!m.get_opt_bool("clip.use_gelu", use_gelu) || !m.get_opt_bool("clip.use_silu", use_silu)) return false;
    if (use_gelu && use_silu) {
        err = "clip.use_gelu and clip.use_silu are both set";
        return false;
    }
    hp.ffn = use_gelu ? ffn_op::gelu_erf : use_silu ? ffn_op::silu : ffn_op::gelu_quick;
    int32_t block_count = 0;
    if (!m.get_int("clip.vision.image_size", 1, MAX_IMAGE_SIZE, hp.image_size)) return false;
    if (!m.get_int("clip.vision.patch_size", 1, MAX_IMAGE_SIZE, hp.patch_size)) return false;
    if (!m.get_int("clip.vision.embedding_length", 1, MAX_WIDTH, hp.n_embd)) return false;
    if (!m.get_int("clip.vision.feed_forward_length", 1, 8 * MAX_WIDTH, hp.n_ff)) return false;
    if (!m.get_int("clip.vision.attention.head_count", 1, MAX_WIDTH, hp.n_head)) return false;
    if (!m.get_int("clip.vision.block_count", 1, MAX_LAYERS, block_count)) return false;
    if (!m.get_opt_float("clip.vision.attention.layer_norm_epsilon", hp.eps)) return false;
    if (hp.image_size % hp.patch_size != 0) {
        err = fmt("image_size %d is not a multiple of patch_size %d", hp.image_size, hp.patch_size);
        return false;
    }
    if ((int64_t) hp.n_side() * hp.n_side() + 1 > MAX_POSITIONS) {
        err = fmt("%d x %d patches is more than this encoder supports", hp.n_side(), hp.n_side());
        return false;
    }
    if (hp.n_embd % hp.n_head != 0) {
        err = fmt("embedding_length %d is not a multiple of head_count %d", hp.n_embd, hp.n_head);
        return false;
    }
    // LLaVA's "layer -2" = the hidden state after feature_layer layers (the input of layer
    // feature_layer, as llama.cpp counts); without the key, all stored layers (our converter
    // stores exactly those). llama.cpp would run one fewer here (upstream #25817).
    hp.n_layer = block_count;
    const int64_t id = m.find("clip.vision.feature_layer");
    if (id >= 0) {
        const gguf_type t = gguf_get_kv_type(g, id);
        const gguf_type at = t == GGUF_TYPE_ARRAY ? gguf_get_arr_type(g, id) : t;
        const size_t n = t == GGUF_TYPE_ARRAY ? gguf_get_arr_n(g, id) : 1;
        if (!is_int_type(at) || n != 1) {
            err = "clip.vision.feature_layer must hold exactly one integer (one LLaVA feature layer)";
            return false;
        }
        const void * p = t == GGUF_TYPE_ARRAY ? gguf_get_arr_data(g, id) : gguf_get_val_data(g, id);
        const int64_t fl = int_at(at, p);
        if (fl < 1 || fl > block_count) {
            err = fmt("clip.vision.feature_layer %" PRId64 " outside 1..%d (block_count)", fl, block_count);
            return false;
        }
        hp.n_layer = (int32_t) fl;
    }
    return true;
}

// Which FFN naming the file uses, decided as llama.cpp's clip.cpp does (clip_model_loader,
// is_ffn_swapped): from the shape of ffn_down, whose input is the CLIP width only when it holds fc1.
// A square MLP (n_ff == n_embd) leaves the shapes silent; clip.cpp then always swaps, we swap only
// for files without general.type = "mmproj" (upstream's legacy converter never writes it; the
// converters that name the tensors right do): the same rule as llava_local/mmproj.py.
// Every block's shapes are then checked against this choice by expected_tensors.
void read_ffn_layout(const gguf_context * g, hparams & hp) {
    const int64_t id = gguf_find_tensor(g, "v.blk.0.ffn_down.weight");
    if (id < 0) {
        return;   // reported as a missing tensor
    }
    if (hp.n_ff != hp.n_embd) {
        hp.ffn_swapped = gguf_get_tensor_ne(g, id)[0] == hp.n_embd;
        return;
    }
    const int64_t type_id = gguf_find_key(g, "general.type");
    hp.ffn_swapped = !(type_id >= 0 && gguf_get_kv_type(g, type_id) == GGUF_TYPE_STRING &&
                       strcmp(gguf_get_val_str(g, type_id), "mmproj") == 0);
}

std::vector<tensor_spec> expected_tensors(model & m) {
    const hparams & hp = m.hp;
    const int64_t D = hp.n_embd, F = hp.n_ff, P = hp.patch_size;
    std::vector<tensor_spec> v;
    auto add = [&](std::string name, std::initializer_list<int64_t> ne, role r, ggml_tensor ** dst) {
        tensor_spec s{std::move(name), {1, 1, 1, 1}, (int) ne.size(), r, dst};
        int i = 0;
        for (int64_t x : ne) s.ne[i++] = x;
        v.push_back(std::move(s));
    };
    add("v.class_embd", {D}, role::f32, &m.class_embd);
    add("v.patch_embd.weight", {P, P, 3, D}, role::f32, &m.patch_w);
    add("v.position_embd.weight", {D, hp.n_pos()}, role::f32, &m.pos_embd);
    add("v.pre_ln.weight", {D}, role::f32, &m.pre_ln_w);
    add("v.pre_ln.bias", {D}, role::f32, &m.pre_ln_b);
    m.layers.resize(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        layer_weights & L = m.layers[il];
        const std::string b = "v.blk." + std::to_string(il) + ".";
        add(b + "ln1.weight", {D}, role::f32, &L.ln1_w);
        add(b + "ln1.bias", {D}, role::f32, &L.ln1_b);
        add(b + "attn_q.weight", {D, D}, role::matmul, &L.q_w);
        add(b + "attn_q.bias", {D}, role::f32, &L.q_b);
        add(b + "attn_k.weight", {D, D}, role::matmul, &L.k_w);
        add(b + "attn_k.bias", {D}, role::f32, &L.k_b);
        add(b + "attn_v.weight", {D, D}, role::matmul, &L.v_w);
        add(b + "attn_v.bias", {D}, role::f32, &L.v_b);
        add(b + "attn_out.weight", {D, D}, role::matmul, &L.o_w);
        add(b + "attn_out.bias", {D}, role::f32, &L.o_b);
        add(b + "ln2.weight", {D}, role::f32, &L.ln2_w);
        add(b + "ln2.bias", {D}, role::f32, &L.ln2_b);
        const std::string fc1 = b + (hp.ffn_swapped ? "ffn_down." : "ffn_up.");
        const std::string fc2 = b + (hp.ffn_swapped ? "ffn_up." : "ffn_down.");
        add(fc1 + "weight", {D, F}, role::matmul, &L.up_w);
        add(fc1 + "bias", {F}, role::f32, &L.up_b);
        add(fc2 + "weight", {F, D}, role::matmul, &L.down_w);
        add(fc2 + "bias", {D}, role::f32, &L.down_b);
    }
    add("mm.0.weight", {D, hp.n_mm_ff}, role::matmul, &m.mm0_w);
    add("mm.0.bias", {hp.n_mm_ff}, role::f32, &m.mm0_b);
    add("mm.2.weight", {hp.n_mm_ff, hp.n_out}, role::matmul, &m.mm2_w);
    add("mm.2.bias", {hp.n_out}, role::f32, &m.mm2_b);
    return v;
}

// The projector's widths come from its tensors (LLaVA stores no key for the hidden width).
bool read_projector_dims(const gguf_context * g, hparams & hp, std::string & err) {
    const int64_t id0 = gguf_find_tensor(g, "mm.0.weight");
    const int64_t id2 = gguf_find_tensor(g, "mm.2.weight");
    if (id0 < 0 || id2 < 0) {
        err = id0 < 0 ? "missing tensor mm.0.weight" : "missing tensor mm.2.weight (a linear-only projector?)";
        return false;
    }
    const int64_t * ne0 = gguf_get_tensor_ne(g, id0);
    const int64_t * ne2 = gguf_get_tensor_ne(g, id2);
    if (ne0[1] < 1 || ne0[1] > 8 * MAX_WIDTH || ne2[1] < 1 || ne2[1] > 8 * MAX_WIDTH) {
        err = "projector tensors have implausible widths";
        return false;
    }
    hp.n_mm_ff = (int32_t) ne0[1];
    hp.n_out = (int32_t) ne2[1];
    return true;
}

bool upload(FILE * f, const gguf_context * g, const tensor_spec & s, ggml_tensor * t, bool host,
            std::vector<uint8_t> & staging, std::string & err) {
    const ggml_type src_type = gguf_get_tensor_type(g, s.gguf_id);
    const size_t size = gguf_get_tensor_size(g, s.gguf_id);
    const size_t off = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, s.gguf_id);
    const bool convert = src_type != t->type;
    void * dst = (host && !convert) ? t->data : nullptr;
    if (!dst) {
        staging.resize(size);
        dst = staging.data();
    }
    if (fseeko(f, (off_t) off, SEEK_SET) != 0 || fread(dst, 1, size, f) != size) {
        err = fmt("tensor %s: short read at offset %zu (truncated file?)", s.name.c_str(), off);
        return false;
    }
    if (convert && host) {  // to F32
        ggml_get_type_traits(src_type)->to_float(staging.data(), (float *) t->data, ggml_nelements(t));
    } else if (convert) {
        std::vector<float> tmp(ggml_nelements(t));
        ggml_get_type_traits(src_type)->to_float(staging.data(), tmp.data(), (int64_t) tmp.size());
        ggml_backend_tensor_set(t, tmp.data(), 0, tmp.size() * sizeof(float));
    } else if (dst != t->data) {
        ggml_backend_tensor_set(t, staging.data(), 0, size);
    }
    return true;
}

}  // namespace

model::~model() {
    if (buffer) ggml_backend_buffer_free(buffer);
    if (ctx) ggml_free(ctx);
}

int32_t load_model(const char * path, ggml_backend_buffer_type_t buft, bool f32_matmul, model & m, std::string & err) {
    file_ptr f(fopen(path, "rb"));
    if (!f) {
        err = fmt("cannot open: %s", strerror(errno));
        return LLAVA_VISION_ERR_FILE;
    }
    if (fseeko(f.get(), 0, SEEK_END) != 0) {
        err = "cannot seek in the file";
        return LLAVA_VISION_ERR_FILE;
    }
    const off_t end = ftello(f.get());
    if (end < 0) {
        err = "cannot tell the file's size";
        return LLAVA_VISION_ERR_FILE;
    }
    const size_t file_size = (size_t) end;

    gguf_init_params gp = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    gguf_ptr g(gguf_init_from_file(path, gp));
    if (!g) {
        err = "not a readable GGUF file (bad magic, version or header; truncated?)";
        return LLAVA_VISION_ERR_FILE;
    }
    if (!read_hparams(g.get(), m.hp, err) || !read_projector_dims(g.get(), m.hp, err)) {
        return LLAVA_VISION_ERR_MODEL;
    }
    read_ffn_layout(g.get(), m.hp);
    std::vector<tensor_spec> specs = expected_tensors(m);
    for (tensor_spec & s : specs) {
        if (const int32_t rc = check_tensor(g.get(), file_size, s, err); rc != LLAVA_VISION_OK) {
            return rc;
        }
    }

    ggml_init_params ip = {specs.size() * ggml_tensor_overhead(), nullptr, /*no_alloc =*/ true};
    m.ctx = ggml_init(ip);
    if (!m.ctx) {
        err = "cannot create the ggml context for the weights";
        return LLAVA_VISION_ERR_BACKEND;
    }
    for (tensor_spec & s : specs) {
        const ggml_type stored = gguf_get_tensor_type(g.get(), s.gguf_id);
        const bool widen = s.r == role::f32 || (f32_matmul && (stored == GGML_TYPE_F16 || stored == GGML_TYPE_BF16));
        const ggml_type type = widen ? GGML_TYPE_F32 : stored;
        ggml_tensor * t = ggml_new_tensor(m.ctx, type, s.n_dims, s.ne);
        ggml_set_name(t, s.name.c_str());
        *s.dst = t;
    }
    m.file_type = gguf_get_tensor_type(g.get(), gguf_find_tensor(g.get(), "v.blk.0.attn_q.weight"));
    m.weight_type = m.layers[0].q_w->type;
    m.buffer = ggml_backend_alloc_ctx_tensors_from_buft(m.ctx, buft);
    if (!m.buffer) {
        err = fmt("cannot allocate %zu MB of weights on %s", ggml_backend_alloc_ctx_tensors_from_buft_size(m.ctx, buft) >> 20,
                  ggml_backend_buft_name(buft));
        return LLAVA_VISION_ERR_BACKEND;
    }
    ggml_backend_buffer_set_usage(m.buffer, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    const bool host = ggml_backend_buffer_is_host(m.buffer);
    std::vector<uint8_t> staging;
    for (const tensor_spec & s : specs) {
        if (!upload(f.get(), g.get(), s, *s.dst, host, staging, err)) {
            return LLAVA_VISION_ERR_FILE;
        }
    }
    return LLAVA_VISION_OK;
}

}  // namespace llava_vision
