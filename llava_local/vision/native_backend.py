"""`native` vision backend: our own ggml graph for LLaVA's CLIP + projector (native/, libllava_vision).

Exact like `torch` (CLS first, the feature layer's count of layers, quick-GELU and erf GELU in F32)
and fast like `mtmd`: it runs on the ggml that llama-cpp-python installed (CPU threads, or CUDA /
Metal when that build has them, with `device="gpu"`), and encodes a batch of images in one graph.

`pip install -e .` builds the library into llava_local/_native/ (setup.py runs CMakeLists.txt); if
that failed, creating this backend raises BackendUnavailableError and the engine falls back.
LLAVA_LOCAL_NATIVE_LIB=/path/to/libllava_vision.so points at another build.

    backend = create_backend("native", read_mmproj("mmproj-F16.gguf"), VisionOptions(threads=8, max_batch=8))
    emb = backend.encode(images)               # (n_images, 576, 4096) float32

On the CPU, F16/BF16 matrices are widened to F32 at load (`cpu_f32_weights`, native/README.md) except
for `workload="oneshot"`, where the load time and twice the memory cost more than they save;
`VisionOptions(cpu_f32_weights=True/False)` decides it explicitly.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import sys
from pathlib import Path

import numpy as np

from llava_local.errors import BackendUnavailableError, ModelFilesError
from llava_local.vision.base import PixelBackend, VisionOptions, register_backend

log = logging.getLogger(__name__)

LIB_ENV = "LLAVA_LOCAL_NATIVE_LIB"
LIB_NAME = {"darwin": "libllava_vision.dylib", "win32": "llava_vision.dll"}.get(sys.platform, "libllava_vision.so")
ERR_LEN = 2048

# enum llava_vision_status (native/llava_vision.h)
OK, ERR_ARGUMENT, ERR_FILE, ERR_MODEL, ERR_BACKEND, ERR_COMPUTE = range(6)


class NativeParams(ctypes.Structure):  # struct llava_vision_params; see the header for each field
    _fields_ = [("n_threads", ctypes.c_int32),
                ("use_gpu", ctypes.c_int32),
                ("max_batch", ctypes.c_int32),
                ("flash_attn", ctypes.c_int32),
                ("cpu_f32_weights", ctypes.c_int32)]


def library_path() -> Path:
    env = os.environ.get(LIB_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "_native" / LIB_NAME


_LIB: ctypes.CDLL | None = None


def load_library() -> ctypes.CDLL:
    """The ctypes handle of libllava_vision, loaded once; BackendUnavailableError if it cannot be."""
    global _LIB
    if _LIB is not None:
        return _LIB
    path = library_path()
    if not path.is_file():
        raise BackendUnavailableError(f"native encoder not built: {path} is missing "
                                      "(reinstall with cmake and a C++ compiler: pip install -e .)")
    try:
        # llama_cpp's libllama pulls in its libggml*; our library then binds to those very copies
        # (same soname), so the encoder and the LLM share one ggml and one device registry.
        importlib.import_module("llama_cpp.llama_cpp")
    except (ImportError, OSError) as exc:
        raise BackendUnavailableError(f"native encoder not built: llama_cpp cannot be loaded ({exc})") from None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BackendUnavailableError(f"native encoder not built: cannot load {path} ({exc})") from None
    c = ctypes
    ctx_p, err_p = c.c_void_p, c.c_char_p
    lib.llava_vision_default_params.restype = NativeParams
    lib.llava_vision_default_params.argtypes = []
    lib.llava_vision_init_from_file.restype = ctx_p
    lib.llava_vision_init_from_file.argtypes = [c.c_char_p, NativeParams, err_p, c.c_size_t]
    lib.llava_vision_init_status.restype = c.c_int32
    lib.llava_vision_init_status.argtypes = []
    lib.llava_vision_encode_batch.restype = c.c_int32
    lib.llava_vision_encode_batch.argtypes = [ctx_p, c.POINTER(c.c_float), c.c_int32, c.POINTER(c.c_float),
                                              err_p, c.c_size_t]
    lib.llava_vision_free.restype = None
    lib.llava_vision_free.argtypes = [ctx_p]
    for name in ("n_tokens", "n_embd", "image_size", "n_layers", "max_batch", "flash_attn"):
        fn = getattr(lib, "llava_vision_" + name)
        fn.restype, fn.argtypes = c.c_int32, [ctx_p]
    for name in ("backend_name", "weight_type", "file_type"):
        fn = getattr(lib, "llava_vision_" + name)
        fn.restype, fn.argtypes = c.c_char_p, [ctx_p]
    _LIB = lib
    return lib


@register_backend("native")
class NativeBackend(PixelBackend):
    exact = True

    def __init__(self, mmproj, options: VisionOptions, llm=None):
        del llm  # the encoder has its own ggml context; it shares only the library with the LLM
        super().__init__(mmproj, options)
        device = options.device
        cpu_f32_weights = options.cpu_f32_weights
        if cpu_f32_weights is None:
            # One question: widening F16 to F32 at load costs seconds and doubles the weights' memory
            # (ViT-L/14-336: 0.6 -> 1.25 GB), more than F32 matmuls save on one image (bench/startup.py).
            cpu_f32_weights = options.workload != "oneshot"
        self._lib = lib = load_library()
        params = lib.llava_vision_default_params()
        params.n_threads = int(options.threads or 0)
        params.use_gpu = int(device == "gpu")
        params.max_batch = int(options.max_batch)
        params.flash_attn = -1 if options.flash_attn is None else int(options.flash_attn)
        params.cpu_f32_weights = int(cpu_f32_weights)
        err = ctypes.create_string_buffer(ERR_LEN)
        self.device_name = "GPU" if device == "gpu" else "CPU"
        self.ctx = lib.llava_vision_init_from_file(os.fsencode(str(mmproj.path)), params, err, ERR_LEN)
        if not self.ctx:
            self._raise(lib.llava_vision_init_status(), err.value.decode(errors="replace"))
        got = (lib.llava_vision_n_tokens(self.ctx), lib.llava_vision_n_embd(self.ctx),
               lib.llava_vision_image_size(self.ctx))
        want = (self.n_tokens, self.n_embd, mmproj.image_size)
        if got != want:  # the two readers of one file disagree: a bug, but never return wrong shapes
            self.close()
            raise ModelFilesError(f"{mmproj.path}: native encoder reads (tokens, width, image size) {got}, "
                                  f"the Python reader {want}")
        self.max_batch = lib.llava_vision_max_batch(self.ctx)
        self.device_name = lib.llava_vision_backend_name(self.ctx).decode()
        log.info("native vision encoder on %s: %d layers, %s weights (%s in the file), flash attention %s",
                 self.device_name, lib.llava_vision_n_layers(self.ctx), lib.llava_vision_weight_type(self.ctx).decode(),
                 lib.llava_vision_file_type(self.ctx).decode(), "on" if lib.llava_vision_flash_attn(self.ctx) else "off")

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) normalised pixels -> (B, n_tokens, n_embd), in graphs of up to max_batch images."""
        if not self.ctx:
            raise ValueError("native backend is closed")
        s = self.mmproj.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixels of shape {pixels.shape}, expected (B, 3, {s}, {s})")
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        n = pixels.shape[0]
        out = np.empty((n, self.n_tokens, self.n_embd), dtype=np.float32)
        err = ctypes.create_string_buffer(ERR_LEN)
        fp = ctypes.POINTER(ctypes.c_float)
        for i in range(0, n, self.max_batch):
            src, dst = pixels[i:i + self.max_batch], out[i:i + self.max_batch]
            rc = self._lib.llava_vision_encode_batch(self.ctx, src.ctypes.data_as(fp), src.shape[0],
                                                     dst.ctypes.data_as(fp), err, ERR_LEN)
            if rc != OK:
                msg = err.value.decode(errors="replace")
                self._raise(rc, f"{self.mmproj.path}: {msg}" if rc == ERR_COMPUTE else msg)
        return out

    def _raise(self, rc: int, msg: str):
        """An llava_vision_status as the library's error: bad files are the user's to fix; a device
        that cannot take the model (out of memory) is a backend that cannot run here."""
        if rc == ERR_ARGUMENT:
            raise ValueError(f"native encoder: {msg}")
        if rc == ERR_BACKEND:
            raise BackendUnavailableError(f"native encoder on {self.device_name}: {msg}")
        raise ModelFilesError(f"native encoder: {msg}")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._lib.llava_vision_free(self.ctx)
            self.ctx = None
