"""Vision backends: images in, float32 image embeddings out: `embed(images)` gives one `(n_tokens_i, n_embd)`
array per image for any model (a LLaVA-1.6 image's count depends on its size: `tokens_for(w, h)`),
`encode(images)` one `(n_images, n_tokens, n_embd)` array for fixed-size (LLaVA-1.5) models.

Every backend reads the same mmproj GGUF and uses the shared preprocessing (preprocess.py); the LLM
side (llm.py) consumes whatever they produce through `llama_batch` embeddings, so any backend can
feed any engine. Registry: name -> class; `create_backend(name, mmproj, VisionOptions(...))` builds one.

| name  | what runs the CLIP+projector                     | faithful to LLaVA? |
|-------|--------------------------------------------------|--------------------|
| torch | PyTorch (transformers CLIPVisionModel), fp32     | exact (reference)  |
| mtmd  | llama.cpp's clip graph through libmtmd (CPU/GPU) | no: upstream #25814 |
| onnx  | onnxruntime (CPU, CUDA, CoreML), from `convert --onnx` | exact (fp32)    |
| native | our ggml graph (native/), CPU/CUDA/Metal as llama.cpp was built | exact |
"""
from __future__ import annotations

# the backends register themselves; onnxruntime, torch and libllava_vision load only when one is created
from llava_local.vision import mtmd_backend, native_backend, onnx_backend, torch_backend
from llava_local.vision.base import (BACKENDS, VisionBackend, VisionOptions, create_backend, preprocess_config,
                                     register_backend)

__all__ = ["BACKENDS", "VisionBackend", "VisionOptions", "create_backend", "preprocess_config", "register_backend",
           "mtmd_backend", "native_backend", "onnx_backend", "torch_backend"]
