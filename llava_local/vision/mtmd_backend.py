"""`mtmd` vision backend: llama.cpp's own clip graph through libmtmd (CPU, CUDA or Metal).

Fast and GPU-capable, but it inherits upstream's LLaVA graph: the CLS token is appended after the
patches, so every patch gets a shifted position embedding (upstream #25814). The test suite
measures the resulting cosine against the PyTorch reference; the README reports it.

We hand mtmd our own padded + resized RGB image (the shared preprocessing), so both backends see
identical pixels and any difference is the graph's.
"""
from __future__ import annotations

import ctypes
import logging
import os

import numpy as np
from PIL import Image

from llava_local.errors import BackendUnavailableError, ModelFilesError
from llava_local.image.preprocess import square_image
from llava_local.vision.base import VisionBackend, VisionOptions, register_backend

log = logging.getLogger(__name__)


@register_backend("mtmd")
class MtmdBackend(VisionBackend):
    def __init__(self, mmproj, options: VisionOptions, llm=None):
        super().__init__(mmproj)
        if llm is None:
            raise BackendUnavailableError("the mtmd backend needs the loaded LLM (libmtmd binds to a llama model)")
        try:
            from llama_cpp import mtmd_cpp
        except (ImportError, OSError) as exc:
            raise BackendUnavailableError(f"libmtmd is not available in this llama-cpp-python ({exc})") from None
        self._M = mtmd_cpp
        self._llm = llm
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = options.device == "gpu"
        params.print_timings = options.verbose
        params.n_threads = options.threads or max(1, os.cpu_count() or 2)
        params.warmup = False
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj.path).encode(), llm.model, params)
        if not self.ctx:
            raise ModelFilesError(f"{mmproj.path}: libmtmd could not load this mmproj (run with --verbose for its log)")
        self.marker = mtmd_cpp.mtmd_default_marker()

    def _encode_one(self, img: Image.Image) -> np.ndarray:
        M = self._M
        sq = square_image(img, self.preprocess_config).convert("RGB")
        data = np.ascontiguousarray(np.asarray(sq, dtype=np.uint8))
        bitmap = M.mtmd_bitmap_init(sq.width, sq.height, data.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = M.mtmd_input_chunks_init()
        try:
            text = M.mtmd_input_text()
            text.text = self.marker
            text.text_len = len(self.marker)
            text.add_special = False
            text.parse_special = True
            bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = M.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise ModelFilesError(f"{self.mmproj.path}: mtmd_tokenize failed ({rc})")
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(chunk) != M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = M.mtmd_input_chunk_get_n_tokens(chunk)
                if n != self.n_tokens:
                    raise ModelFilesError(f"{self.mmproj.path}: mtmd made {n} image tokens, expected {self.n_tokens}")
                rc = M.mtmd_encode_chunk(self.ctx, chunk)
                if rc != 0:
                    raise ModelFilesError(f"{self.mmproj.path}: mtmd_encode_chunk failed ({rc})")
                ptr = M.mtmd_get_output_embd(self.ctx)
                return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
            raise ModelFilesError(f"{self.mmproj.path}: mtmd produced no image chunk")
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)

    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([self._encode_one(im) for im in images])

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._M.mtmd_free(self.ctx)
            self.ctx = None
