"""llama-cpp-python's ctypes bindings of llama.cpp's C API, initialised once, with llama.cpp's and
libmtmd's own log routed through ours (shown with --verbose). Bottom layer: the runtime's LLM, the
placement probe, the mtmd vision backend and convert's quantizer all load llama.cpp through here.

    L = llama_cpp_lib()
    L.llama_supports_gpu_offload()
"""
from __future__ import annotations

import ctypes
import logging
import sys
import threading

_init_lock = threading.Lock()
_backend_ready = False
_show_native_log = False
_native_log = logging.getLogger("llava_local.llama_cpp")
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level


def _on_native_log(level: int, text: bytes, _user) -> None:
    # llama.cpp and libmtmd print freely; we show it only with --verbose (errors reach the user as
    # our own exceptions). llama-cpp-python's own hook maps ggml's levels off by one (WARN as ERROR).
    if _show_native_log and text:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
    elif text and _GGML_LEVELS.get(level) == logging.ERROR:
        _native_log.debug(text.decode("utf-8", errors="replace").rstrip())


_native_log_cb = None  # keep the ctypes callback alive for the life of the process


def llama_cpp_lib(verbose: bool = False):
    """Import llama_cpp's C bindings once; llama.cpp's own log goes to stderr only when `verbose`."""
    global _backend_ready, _show_native_log, _native_log_cb
    import llama_cpp
    _show_native_log = verbose
    with _init_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _native_log_cb = llama_cpp.llama_log_callback(_on_native_log)
            llama_cpp.llama_log_set(_native_log_cb, ctypes.c_void_p(0))
            try:  # libmtmd (clip) logs through its own hook
                from llama_cpp import mtmd_cpp
                mtmd_cpp.mtmd_log_set(_native_log_cb, ctypes.c_void_p(0))
                mtmd_cpp.mtmd_helper_log_set(_native_log_cb, ctypes.c_void_p(0))
            except (ImportError, OSError, AttributeError):
                pass
            _backend_ready = True
    return llama_cpp
