"""Shared by the benches that time llama-cpp-python as the baseline a user would write.

llama-cpp-python's `Llama` takes llama.cpp's default model params; give it the same extra-buffer-type
choice as our LlamaLLM (on, unless the once-per-CPU probe saw them die with SIGILL, as on VMs that
advertise AMX without enabling it), so both sides run the same CPU kernels.
"""
from __future__ import annotations


def use_same_cpu_buffers_as_llava_local() -> None:
    import llama_cpp
    import llama_cpp.llama as llama_mod

    from llava_local.runtime.extra_bufts_probe import extra_buffer_types_allowed
    original = llama_cpp.llama_model_default_params
    if getattr(original, "_llava_local", False):
        return
    allowed = extra_buffer_types_allowed()

    def params():
        p = original()
        p.use_extra_bufts = allowed
        return p
    params._llava_local = True
    llama_cpp.llama_model_default_params = params
    llama_mod.llama_cpp.llama_model_default_params = params
