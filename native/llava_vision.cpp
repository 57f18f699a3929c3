// The C API (llava_vision.h): device choice, the scheduler, and one graph per encode call.
//
// The device comes from ggml's registry, so this library runs wherever the ggml it links (the one
// llama-cpp-python installed) runs: a CUDA or Metal build of llama-cpp-python gives a CUDA or
// Metal encoder. The CPU backend always joins the scheduler, for any op a GPU backend lacks.
#include "llava_vision.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "vision_graph.h"
#include "vision_model.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

namespace lv = llava_vision;

namespace {

constexpr int32_t MAX_BATCH_LIMIT = 1024;

thread_local int32_t g_init_status = LLAVA_VISION_OK;

void set_err(char * buf, size_t len, const std::string & msg) {
    if (buf && len > 0) {
        snprintf(buf, len, "%s", msg.c_str());
    }
}

// Records why init failed; returns the NULL that init hands back.
llava_vision_context * init_failed(int32_t status, char * buf, size_t len, const std::string & msg) {
    g_init_status = status;
    set_err(buf, len, msg);
    return nullptr;
}

bool all_finite(const float * x, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(x[i])) return false;
    }
    return true;
}

// The first GPU (or integrated GPU) ggml knows, when asked for one.
ggml_backend_dev_t pick_device(bool use_gpu) {
    if (use_gpu) {
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t d = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_GPU) return d;
        }
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t d = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_IGPU) return d;
        }
    }
    return ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
}

void set_threads(ggml_backend_t backend, int n_threads) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto fn = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads")
                  : nullptr;
    if (fn) fn(backend, n_threads);
}

}  // namespace

struct llava_vision_context {
    std::unique_ptr<lv::model> model;
    ggml_backend_t backend = nullptr;      // where the graph runs
    ggml_backend_t backend_cpu = nullptr;  // fallback for ops `backend` lacks; null when backend is the CPU
    ggml_backend_sched_t sched = nullptr;
    std::vector<uint8_t> meta;             // the graph's tensor metadata (no data)
    int32_t max_batch = 1;
    bool flash_attn = false;
    ggml_type kv_type = GGML_TYPE_F32;
    std::string backend_name;
    std::mutex mu;

    ~llava_vision_context() {
        if (sched) ggml_backend_sched_free(sched);
        model.reset();  // its buffer goes before the backends
        if (backend_cpu) ggml_backend_free(backend_cpu);
        if (backend) ggml_backend_free(backend);
    }

    // Builds the graph for `n` images in ctx-owned metadata; the caller frees the returned context.
    ggml_context * new_graph(int n, lv::vision_graph & g) {
        ggml_init_params ip = {meta.size(), meta.data(), /*no_alloc =*/ true};
        ggml_context * ctx0 = ggml_init(ip);
        if (ctx0) g = lv::build_graph(ctx0, *model, n, flash_attn, kv_type);
        return ctx0;
    }
};

extern "C" {

llava_vision_params llava_vision_default_params(void) {
    llava_vision_params p;
    p.n_threads = 0;
    p.use_gpu = 1;
    p.max_batch = 8;
    p.flash_attn = -1;
    p.cpu_f32_weights = 1;
    return p;
}

llava_vision_context * llava_vision_init_from_file(const char * path, llava_vision_params params, char * err_buf,
                                                   size_t err_len) {
    try {
        g_init_status = LLAVA_VISION_OK;
        if (!path) {
            return init_failed(LLAVA_VISION_ERR_ARGUMENT, err_buf, err_len, "path is NULL");
        }
        if (params.max_batch < 1 || params.max_batch > MAX_BATCH_LIMIT) {
            return init_failed(LLAVA_VISION_ERR_ARGUMENT, err_buf, err_len, "max_batch " +
                               std::to_string(params.max_batch) + " outside 1.." + std::to_string(MAX_BATCH_LIMIT));
        }
        if (ggml_backend_dev_count() == 0) {
            ggml_backend_load_all();  // a GGML_BACKEND_DL build registers nothing until asked
        }
        auto ctx = std::make_unique<llava_vision_context>();
        ctx->max_batch = params.max_batch;

        ggml_backend_dev_t dev = pick_device(params.use_gpu != 0);
        if (!dev) {
            return init_failed(LLAVA_VISION_ERR_BACKEND, err_buf, err_len, "ggml has no CPU device (is libggml-cpu present?)");
        }
        ctx->backend = ggml_backend_dev_init(dev, nullptr);
        if (!ctx->backend) {
            return init_failed(LLAVA_VISION_ERR_BACKEND, err_buf, err_len,
                               std::string("cannot initialise ggml device ") + ggml_backend_dev_name(dev));
        }
        ctx->backend_name = ggml_backend_name(ctx->backend);
        const int n_threads = params.n_threads > 0 ? params.n_threads
                                                   : (int) std::max(1u, std::thread::hardware_concurrency());
        const bool on_cpu = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
        if (on_cpu) {
            set_threads(ctx->backend, n_threads);
            ctx->flash_attn = params.flash_attn != 0;
        } else {
            ctx->backend_cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
            if (ctx->backend_cpu) set_threads(ctx->backend_cpu, n_threads);
            ctx->flash_attn = params.flash_attn > 0;
            ctx->kv_type = GGML_TYPE_F16;  // GPU flash-attention kernels take F16 K/V
        }

        ctx->model = std::make_unique<lv::model>();
        std::string err;
        const int32_t rc = lv::load_model(path, ggml_backend_get_default_buffer_type(ctx->backend),
                                          on_cpu && params.cpu_f32_weights != 0, *ctx->model, err);
        if (rc != LLAVA_VISION_OK) {
            return init_failed(rc, err_buf, err_len, std::string(path) + ": " + err);
        }

        std::vector<ggml_backend_t> backends = {ctx->backend};
        if (ctx->backend_cpu) backends.push_back(ctx->backend_cpu);
        const lv::hparams & hp = ctx->model->hp;
        ctx->meta.resize(lv::graph_meta_size(hp));
        // room for every node, every weight and the copies between backends
        ctx->sched = ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(),
                                            2 * (size_t) lv::max_graph_nodes(hp), false, true);
        if (!ctx->sched) {
            return init_failed(LLAVA_VISION_ERR_BACKEND, err_buf, err_len, "cannot create the ggml scheduler");
        }
        // Allocate for one image now, so an unsupported op or a device out of memory shows here
        // rather than at the first encode. Larger batches grow the buffers on first use.
        lv::vision_graph g;
        ggml_context * ctx0 = ctx->new_graph(1, g);
        const bool ok = ctx0 && ggml_backend_sched_reserve(ctx->sched, g.gf);
        if (ctx0) ggml_free(ctx0);
        if (!ok) {
            return init_failed(LLAVA_VISION_ERR_BACKEND, err_buf, err_len,
                               "cannot allocate the compute buffers on " + ctx->backend_name);
        }
        return ctx.release();
    } catch (const std::bad_alloc &) {
        return init_failed(LLAVA_VISION_ERR_BACKEND, err_buf, err_len, "out of memory while loading the vision model");
    } catch (const std::exception & e) {
        return init_failed(LLAVA_VISION_ERR_BACKEND, err_buf, err_len,
                           std::string("error while loading the vision model: ") + e.what());
    }
}

int32_t llava_vision_init_status(void) {
    return g_init_status;
}

int32_t llava_vision_encode_batch(llava_vision_context * ctx, const float * pixels, int32_t n_images, float * out,
                                  char * err_buf, size_t err_len) {
    if (!ctx || !pixels || !out) {
        set_err(err_buf, err_len, "null context, pixels or output");
        return LLAVA_VISION_ERR_ARGUMENT;
    }
    if (n_images < 1 || n_images > ctx->max_batch) {
        set_err(err_buf, err_len, "batch of " + std::to_string(n_images) + " images outside 1.." +
                                      std::to_string(ctx->max_batch) + " (max_batch)");
        return LLAVA_VISION_ERR_ARGUMENT;
    }
    const lv::hparams & hp = ctx->model->hp;
    const size_t n_in = (size_t) n_images * 3 * hp.image_size * hp.image_size;
    if (!all_finite(pixels, n_in)) {
        set_err(err_buf, err_len, "pixels contain NaN or infinity");
        return LLAVA_VISION_ERR_ARGUMENT;
    }
    try {
        std::lock_guard<std::mutex> lock(ctx->mu);
        lv::vision_graph g;
        std::unique_ptr<ggml_context, decltype(&ggml_free)> ctx0(ctx->new_graph(n_images, g), ggml_free);
        if (!ctx0) {
            set_err(err_buf, err_len, "cannot create the graph context");
            return LLAVA_VISION_ERR_BACKEND;
        }
        ggml_backend_sched_reset(ctx->sched);
        if (!ggml_backend_sched_alloc_graph(ctx->sched, g.gf)) {
            set_err(err_buf, err_len, "cannot allocate compute buffers for " + std::to_string(n_images) +
                                          " images on " + ctx->backend_name + " (lower max_batch)");
            return LLAVA_VISION_ERR_BACKEND;
        }
        ggml_backend_tensor_set(g.pixels, pixels, 0, n_in * sizeof(float));
        const ggml_status st = ggml_backend_sched_graph_compute(ctx->sched, g.gf);
        if (st != GGML_STATUS_SUCCESS) {
            set_err(err_buf, err_len, std::string("graph compute failed: ") + ggml_status_to_string(st));
            return LLAVA_VISION_ERR_COMPUTE;
        }
        const size_t n_out = (size_t) n_images * hp.n_patches() * hp.n_out;
        ggml_backend_tensor_get(g.out, out, 0, n_out * sizeof(float));
        if (!all_finite(out, n_out)) {
            set_err(err_buf, err_len, "the encoder produced NaN or infinity (overflow in the weights?)");
            return LLAVA_VISION_ERR_COMPUTE;
        }
        return LLAVA_VISION_OK;
    } catch (const std::bad_alloc &) {
        set_err(err_buf, err_len, "out of memory while encoding");
    } catch (const std::exception & e) {
        set_err(err_buf, err_len, std::string("error while encoding: ") + e.what());
    }
    return LLAVA_VISION_ERR_COMPUTE;
}

void llava_vision_free(llava_vision_context * ctx) {
    delete ctx;
}

int32_t llava_vision_n_tokens(const llava_vision_context * ctx) { return ctx ? ctx->model->hp.n_patches() : 0; }
int32_t llava_vision_n_embd(const llava_vision_context * ctx) { return ctx ? ctx->model->hp.n_out : 0; }
int32_t llava_vision_image_size(const llava_vision_context * ctx) { return ctx ? ctx->model->hp.image_size : 0; }
int32_t llava_vision_n_layers(const llava_vision_context * ctx) { return ctx ? ctx->model->hp.n_layer : 0; }
int32_t llava_vision_max_batch(const llava_vision_context * ctx) { return ctx ? ctx->max_batch : 0; }

const char * llava_vision_backend_name(const llava_vision_context * ctx) {
    return ctx ? ctx->backend_name.c_str() : "";
}

const char * llava_vision_weight_type(const llava_vision_context * ctx) {
    return ctx ? ggml_type_name(ctx->model->weight_type) : "";
}

const char * llava_vision_file_type(const llava_vision_context * ctx) {
    return ctx ? ggml_type_name(ctx->model->file_type) : "";
}

int32_t llava_vision_flash_attn(const llava_vision_context * ctx) { return ctx ? ctx->flash_attn : 0; }

}  // extern "C"
