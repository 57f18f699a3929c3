"""`mtmd` vision backend: llama.cpp's own clip graph through libmtmd (CPU, CUDA or Metal).

Fast and GPU-capable, but it inherits upstream's LLaVA graph: the CLS token is appended after the
patches, so every patch gets a shifted position embedding (upstream #25814). The test suite
measures the resulting cosine against the PyTorch reference; the README reports it.

We hand mtmd our own padded + resized RGB image (the shared preprocessing), so both backends see
identical pixels and any difference is the graph's.

LLaVA-1.6 (anyres) mmproj files: mtmd gets the image itself and tiles it its own way (clip.cpp's
llava_uhd preprocessor). Its graph loads `v.image_newline` but neither unpads nor inserts newlines, so
`embed` returns however many tokens mtmd makes (base + raw tiles: 2880 for a square image at 336 px)
and `tokens_for` asks mtmd for that count on a blank image of the size. Not exact; `max_tiles` is ignored.
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
        super().__init__(mmproj, options)
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
        self._anyres_tokens: dict[tuple[int, int], int] = {}   # (width, height) -> mtmd's token count
        if mmproj.anyres is not None and self.max_tiles is not None:
            log.warning("the mtmd vision backend tiles LLaVA-1.6 images its own way: image max tiles %d is ignored",
                        self.max_tiles)

    def _encode_one(self, img: Image.Image, *, encode: bool = True) -> np.ndarray | int:
        """One image's embeddings (n, n_embd), or with encode=False only mtmd's token count n (its
        preprocessing runs, not the graph)."""
        M = self._M
        sq = img if self.mmproj.anyres is not None else square_image(img, self.preprocess_config)
        sq = sq.convert("RGB")
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
            parts = []   # 1.5: one image chunk; 1.6: the overview, then one chunk per tile
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(chunk) != M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = M.mtmd_input_chunk_get_n_tokens(chunk)
                if not encode:
                    parts.append(n)
                    continue
                rc = M.mtmd_encode_chunk(self.ctx, chunk)
                if rc != 0:
                    raise ModelFilesError(f"{self.mmproj.path}: mtmd_encode_chunk failed ({rc})")
                ptr = M.mtmd_get_output_embd(self.ctx)
                parts.append(np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy())
            if not parts:
                raise ModelFilesError(f"{self.mmproj.path}: mtmd produced no image chunk")
            n = sum(parts) if not encode else sum(len(x) for x in parts)
            if self.mmproj.anyres is None and (len(parts) != 1 or n != self.n_tokens):
                raise ModelFilesError(f"{self.mmproj.path}: mtmd made {n} image tokens in {len(parts)} chunks, "
                                      f"expected {self.n_tokens} in one")
            return n if not encode else np.concatenate(parts)
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)

    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([self._encode_one(im) for im in images])

    def _embed(self, images: list[Image.Image]) -> list[np.ndarray]:
        return [self._encode_one(im) for im in images]

    def tokens_for(self, width: int, height: int) -> int:
        if self.mmproj.anyres is None:
            return self.n_tokens
        if (width, height) not in self._anyres_tokens:   # mtmd's preprocessing only, no encoding
            self._anyres_tokens[(width, height)] = self._encode_one(Image.new("RGB", (width, height)), encode=False)
        return self._anyres_tokens[(width, height)]

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._M.mtmd_free(self.ctx)
            self.ctx = None
