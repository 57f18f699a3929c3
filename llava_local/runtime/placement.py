"""Where the LLM and the vision encoder run: the one resolver behind `-ngl auto`, `--vision-device
auto` and `--vision-backend auto`, used by the Python API, every command, the caption worker and the
benches.

    p = resolve_placement(pair, gpu_layers="auto", vision_backend="auto", vision_device="auto",
                          n_ctx=4096, workload="session")
    p.gpu_layers, p.vision_backend, p.vision_device     # e.g. 33, "native", "gpu"
    p.describe()                                        # what runs where, and why (--verbose, /stats)

Rules (as users of Ollama, LM Studio and llama-server expect: the GPU when there is one):
- LLM layers: 0 on a CPU-only llama.cpp build; all layers when the model, its KV cache and the
  vision encoder fit the GPU's free memory; otherwise as many as fit. llama.cpp's own fitting
  lives in its `common` library, which llama-cpp-python does not ship, so we estimate from the GGUF's
  tensor sizes (the same inputs it uses). An integer is taken as given.
- Vision backend: only exact backends (native, torch, onnx) are chosen automatically; llama.cpp's
  own clip graph (`mtmd`, upstream #25814) only on request. On a GPU, and for one-shot work on a CPU
  (where importing PyTorch costs seconds), `native` first; for long sessions and batches on a CPU,
  PyTorch's kernels encode faster than ggml's (README, bench/vision_encoders.py), so `torch` first.
- Vision device: the GPU when the chosen backend can use one here.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llava_local.errors import BackendUnavailableError, LlavaLocalError

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

log = logging.getLogger(__name__)

EXACT_BACKENDS = ("native", "torch", "onnx")
WORKLOADS = ("oneshot", "session", "batch")
GPU_RESERVE_BYTES = 768 << 20     # compute buffers, CUDA context and fragmentation headroom
VISION_ACTIVATION_FACTOR = 1.5    # the encoder's weights plus room for a batch's activations


@dataclass(frozen=True)
class GpuInfo:
    name: str
    free: int                      # bytes
    total: int


@dataclass(frozen=True)
class Placement:
    gpu_layers: int                # passed to llama.cpp (> n_layer: the output layer too)
    n_layer: int
    vision_backend: str
    vision_device: str             # "cpu" or "gpu"
    gpu: GpuInfo | None
    reasons: tuple[str, ...] = field(default=())

    @property
    def llm_device(self) -> str:
        if self.gpu_layers <= 0 or self.gpu is None:
            return "cpu"
        return "gpu" if self.gpu_layers > self.n_layer else f"gpu ({self.gpu_layers}/{self.n_layer + 1} layers)"

    def describe(self) -> str:
        where = f"LLM on {self.llm_device}, vision encoder {self.vision_backend} on {self.vision_device}"
        return where + (" (" + "; ".join(self.reasons) + ")" if self.reasons else "")


# --- what this build and machine offer ---

def _ggml() -> ctypes.CDLL | None:
    """libggml as llama_cpp loaded it (the same device registry as the LLM's)."""
    import llama_cpp
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            lib = ctypes.CDLL(path)
            lib.ggml_backend_dev_count.restype = ctypes.c_size_t
            lib.ggml_backend_dev_get.restype = ctypes.c_void_p
            lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
            lib.ggml_backend_dev_type.restype = ctypes.c_int
            lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
            lib.ggml_backend_dev_description.restype = ctypes.c_char_p
            lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
            lib.ggml_backend_dev_memory.restype = None
            lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                    ctypes.POINTER(ctypes.c_size_t)]
            return lib
    return None


_GPU_TYPES = (1, 2)   # enum ggml_backend_dev_type: GPU, IGPU


def llama_gpu() -> GpuInfo | None:
    """The first GPU llama.cpp can offload to (its free memory now), or None on a CPU-only build."""
    from llava_local.llama_lib import llama_cpp_lib
    L = llama_cpp_lib()
    if not L.llama_supports_gpu_offload():
        return None
    try:
        lib = _ggml()
    except OSError as exc:
        log.debug("cannot read ggml's device list: %s", exc)
        lib = None
    if lib is None:   # offload is possible but the devices cannot be listed: assume room
        return GpuInfo("GPU", 1 << 62, 1 << 62)
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) in _GPU_TYPES:
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            desc = (lib.ggml_backend_dev_description(dev) or b"GPU").decode(errors="replace")
            return GpuInfo(desc, int(free.value), int(total.value))
    return None


def torch_cuda_available() -> bool:
    """Without importing torch when it is absent; importing it is the price of asking."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch
    return bool(torch.cuda.is_available())


def backend_available(name: str, pair: "ModelPair") -> str | None:
    """None when `name` can be created here for this pair, else why not (without loading weights)."""
    if name == "native":
        from llava_local.vision.native_backend import load_library
        try:
            load_library()
        except BackendUnavailableError as exc:
            return str(exc)
        return None
    if name == "torch":
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return "PyTorch/transformers are not installed"
        return None
    if name == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        from llava_local.vision.onnx_backend import find_onnx_model
        try:
            find_onnx_model(pair.mmproj_path)
        except (BackendUnavailableError, LlavaLocalError) as exc:
            return str(exc)
        return None
    return None


def backend_can_use_gpu(name: str, gpu: GpuInfo | None) -> bool:
    if name in ("native", "mtmd"):
        return gpu is not None            # the same ggml build as the LLM
    if name == "torch":
        return torch_cuda_available()
    if name == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return False
        import onnxruntime

        from llava_local.vision.onnx_backend import GPU_PROVIDERS
        return any(p in onnxruntime.get_available_providers() for p in GPU_PROVIDERS)
    return False


# --- memory estimate for -ngl auto ---

def _llm_bytes(pair: "ModelPair", n_ctx: int) -> tuple[int, int, int]:
    """(bytes per repeating layer incl. its F16 KV cache, bytes of the output layer, n_layer)."""
    info = pair.llm
    arch = info.architecture or "llama"
    n_layer = int(info.get(f"{arch}.block_count", 0) or 0)
    per_layer = [0] * n_layer
    output = 0
    for name, t in info.tensors.items():
        if name.startswith("blk."):
            try:
                per_layer[int(name.split(".")[1])] += t.nbytes
            except (ValueError, IndexError):
                pass
        elif name.startswith("output"):
            output += t.nbytes
    if output == 0 and "token_embd.weight" in info.tensors:   # tied embeddings: the output reuses them
        output = info.tensors["token_embd.weight"].nbytes
    n_embd = int(info.get(f"{arch}.embedding_length", 0) or 0)
    n_head = int(info.get(f"{arch}.attention.head_count", 1) or 1)
    n_kv = int(info.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
    kv = 2 * n_ctx * (n_embd * n_kv // max(n_head, 1)) * 2        # K and V, F16
    layer = (max(per_layer) if per_layer else 0) + kv
    return layer, output, n_layer


def fit_gpu_layers(pair: "ModelPair", gpu: GpuInfo, n_ctx: int, *, vision_on_gpu: bool) -> tuple[int, str]:
    """As many layers as fit `gpu.free` after the vision encoder and headroom; (layers, why)."""
    layer, output, n_layer = _llm_bytes(pair, n_ctx)
    vision = int(pair.mmproj_path.stat().st_size * VISION_ACTIVATION_FACTOR) if vision_on_gpu else 0
    budget = gpu.free - GPU_RESERVE_BYTES - vision
    need_all = layer * n_layer + output
    gib = 1 << 30
    if budget >= need_all:
        return n_layer + 1, (f"all {n_layer} layers fit {gpu.name}: {need_all / gib:.1f} GiB of "
                             f"{gpu.free / gib:.1f} GiB free")
    n = max(0, min(n_layer, int(budget // layer) if layer else 0))
    return n, (f"{n} of {n_layer} layers fit {gpu.name} ({gpu.free / gib:.1f} GiB free, "
               f"{need_all / gib:.1f} GiB needed for all)")


# --- the resolver ---

def parse_gpu_layers(value) -> int | str:
    """'auto' | 'all' | an integer >= 0 (CLI, env and Python API spell it the same)."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "all"):
            return v
        try:
            value = int(v)
        except ValueError:
            raise LlavaLocalError(f"--gpu-layers must be auto, all or a number of layers, not {value!r}") from None
    if value < 0:
        return "all"                                   # llama.cpp's -1: every layer
    return int(value)


def backend_order(workload: str, on_gpu: bool) -> tuple[str, ...]:
    if on_gpu or workload == "oneshot":
        return ("native", "torch", "onnx")
    return ("torch", "native", "onnx")


def resolve_placement(pair: "ModelPair", *, gpu_layers="auto", vision_backend: str = "auto",
                      vision_device: str = "auto", n_ctx: int = 4096, workload: str = "session") -> Placement:
    """Decide where everything runs; raises BackendUnavailableError when no exact backend can run
    and none was named (naming `--vision-backend mtmd` as the inexact way out)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, not {workload!r}")
    if vision_device not in ("auto", "cpu", "gpu"):
        raise LlavaLocalError(f"--vision-device must be auto, cpu or gpu, not {vision_device!r}")
    ngl = parse_gpu_layers(gpu_layers)
    reasons: list[str] = []
    gpu = llama_gpu()
    arch = pair.llm.architecture or "llama"
    n_layer = int(pair.llm.get(f"{arch}.block_count", 0) or 0)

    # vision backend and device first: the encoder's memory counts when fitting the LLM
    # (torch's CUDA is asked only once torch is the choice: importing it costs seconds on one-shot runs)
    want_gpu = vision_device == "gpu" or (vision_device == "auto" and gpu is not None)
    if vision_backend == "auto":
        why_not = []
        chosen = None
        for name in backend_order(workload, want_gpu):
            err = backend_available(name, pair)
            if err is None:
                chosen = name
                break
            why_not.append(f"{name}: {err}")
        if chosen is None:
            raise BackendUnavailableError(
                "no exact vision backend can run here (" + "; ".join(why_not) + "). "
                "--vision-backend mtmd runs llama.cpp's own clip graph, which is not exact (upstream #25814)")
        if why_not:
            reasons.append("vision backend " + chosen + ", as " + "; ".join(why_not))
        else:
            reasons.append(f"vision backend {chosen}: the first exact one for "
                           f"{'the GPU' if want_gpu else 'a CPU'} and {workload} work")
        vision_backend = chosen
    if vision_device == "auto":
        if backend_can_use_gpu(vision_backend, gpu):
            vision_device = "gpu"
            reasons.append(f"vision on the GPU ({vision_backend} can use it)")
        else:
            vision_device = "cpu"
            reasons.append(f"vision on the CPU ({vision_backend} has no GPU to use here)")

    if ngl == "auto":
        if gpu is None:
            ngl = 0
            reasons.append("LLM on the CPU: this llama.cpp build has no GPU backend "
                           "(llama_supports_gpu_offload() is false)")
        else:
            ngl, why = fit_gpu_layers(pair, gpu, n_ctx, vision_on_gpu=vision_device == "gpu"
                                      and vision_backend in ("native", "mtmd"))
            reasons.append(why)
    elif ngl == "all":
        ngl = n_layer + 1
    elif gpu is None and ngl > 0:
        reasons.append(f"--gpu-layers {ngl} asked, but this llama.cpp build has no GPU backend: the CPU runs them")
        ngl = 0
    return Placement(gpu_layers=int(ngl), n_layer=n_layer, vision_backend=vision_backend,
                     vision_device=vision_device, gpu=gpu, reasons=tuple(reasons))
