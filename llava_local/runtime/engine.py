"""The engine: a validated (LLM, mmproj) pair, a vision backend, and generation on llama.cpp.

    engine = Engine(resolve_pair("out/"), vision_backend="torch")
    answer = engine.ask("What is in the picture?", ["photo.jpg"], max_tokens=64)
    print(answer.text, answer.timings)

Images become embeddings (vision backend), the prompt becomes template segments
(templates.py), and both are fed to llama.cpp in order through `llama_batch` (llm.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np
from PIL import Image

from llava_local.runtime.chat_session import Answer, ChatSession, user_content  # noqa: F401  (re-exported)
from llava_local.errors import BackendUnavailableError
from llava_local.image.load import LoadedImage, load_image
from llava_local.runtime.llm import LlamaLLM
from llava_local.runtime.model_pair import ModelPair, check_context
from llava_local.runtime.placement import backend_can_use_gpu, backend_order, resolve_placement
from llava_local.prompts.render import choose_format
from llava_local.runtime.sampling import SamplingParams
from llava_local.prompts.templates import DEFAULT_TEMPLATE, Message, get_template, tokenize_segments
from llava_local.vision import create_backend

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | bytes | Image.Image | LoadedImage
DEFAULT_CTX = 4096
EMBED_CACHE_SIZE = 64                    # images whose embeddings are kept (576 x 4096 fp32 = 9 MB each)


class Engine:
    """gpu_layers / vision_backend / vision_device: "auto" or a value, resolved once by
    placement.resolve_placement (the GPU when there is one; exact vision backends only);
    workload ("oneshot", "session", "batch") tells it which backend starts or runs fastest."""

    def __init__(self, pair: ModelPair, *, vision_backend: str = "auto", n_ctx: int | None = None,
                 n_gpu_layers: int | str = "auto", vision_device: str = "auto", threads: int | None = None,
                 template: str | None = None, all_logits: bool = False, precise: bool = False, n_seq_max: int = 1,
                 workload: str = "session", verbose: bool = False):
        self.pair = pair
        if n_ctx is None:  # LLaVA-1.5 trains at 4096; never default past what the LLM was trained for
            n_ctx = min(DEFAULT_CTX, pair.n_ctx_train or DEFAULT_CTX)
        check_context(pair, n_ctx)
        self.template = get_template(template or pair.template_name or DEFAULT_TEMPLATE)  # training layout
        self.placement = resolve_placement(pair, gpu_layers=n_gpu_layers, vision_backend=vision_backend,
                                           vision_device=vision_device, n_ctx=n_ctx, workload=workload)
        self.llm = LlamaLLM(pair.llm_path, n_ctx=n_ctx, n_gpu_layers=self.placement.gpu_layers, n_threads=threads,
                            all_logits=all_logits, precise=precise, n_seq_max=n_seq_max, verbose=verbose)
        self.vision = self._make_backend(vision_backend == "auto", workload, threads=threads, verbose=verbose)
        bos = self.llm.bos
        self.format = choose_format(override=template, gguf_template=pair.chat_template, named=pair.template_name,
                                    bos_text=self.llm.token_text(bos) if bos is not None else "",
                                    eos_text=self.llm.token_text(self.llm.eos))
        self.n_images_encoded = 0
        self._embed_cache: OrderedDict[str, object] = OrderedDict()
        st = pair.mmproj_path.stat()
        self._mmproj_id = f"{pair.mmproj_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        self._owner: ChatSession | None = None      # the session whose turns are in the KV cache
        log.info("%s; prompt format: %s", self.placement.describe(), self.format.name)

    def _make_backend(self, auto: bool, workload: str, **kw):
        """The resolved backend; when it was chosen automatically and cannot load this file, the next
        exact one (never llama.cpp's inexact clip graph: that only on request)."""
        p = self.placement
        names = [p.vision_backend] + ([n for n in backend_order(workload, p.vision_device == "gpu")
                                       if n != p.vision_backend] if auto else [])
        errors = []
        for n in names:
            device = p.vision_device if backend_can_use_gpu(n, p.gpu) else "cpu"
            try:
                backend = create_backend(n, self.pair.mmproj, llm=self.llm, vision_device=device,
                                         workload=workload, **kw)
            except BackendUnavailableError as exc:
                if not auto:
                    raise
                log.warning("vision backend %s cannot run here, trying the next exact one: %s", n, exc)
                errors.append(f"{n}: {exc}")
                continue
            if n != p.vision_backend or device != p.vision_device:
                self.placement = dataclasses.replace(p, vision_backend=n, vision_device=device,
                                                     reasons=p.reasons + tuple(errors))
            return backend
        raise BackendUnavailableError("no exact vision backend can run here (" + "; ".join(errors) + "). "
                                      "--vision-backend mtmd runs llama.cpp's own clip graph, which is not "
                                      "exact (upstream #25814)")

    # --- pieces ---
    def load_images(self, images: Sequence[ImageInput]) -> list[LoadedImage]:
        return [im if isinstance(im, LoadedImage) else load_image(im) for im in images]

    def image_embeddings(self, images: Sequence[LoadedImage]) -> tuple[list[np.ndarray], int]:
        """(n_tokens, n_embd) per image, from the cache where possible; returns (embeddings, cache hits)."""
        keys = [f"{self._mmproj_id}:{im.pixel_hash}" for im in images]
        todo = [i for i, k in enumerate(keys) if k not in self._embed_cache]
        todo_unique = list({keys[i]: i for i in todo}.values())
        if todo_unique:
            new = self.encode_images([images[i].image for i in todo_unique])
            for j, i in enumerate(todo_unique):
                self._embed_cache[keys[i]] = new[j]
        out = []
        for k in keys:
            self._embed_cache.move_to_end(k)
            out.append(self._embed_cache[k])
        while len(self._embed_cache) > EMBED_CACHE_SIZE:
            self._embed_cache.popitem(last=False)
        return out, len(images) - len(todo_unique)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.vision.n_tokens, self.vision.n_embd), np.float32)
        out = self.vision.encode(images)
        self.n_images_encoded += len(images)
        return out

    def prompt_items(self, messages: Sequence[Message]):
        segs = self.template.segments(messages, add_generation_prompt=True)
        return tokenize_segments(segs, self.llm.tokenize, self.llm.bos, self.llm.eos).items

    def prefill(self, items, embeds: np.ndarray) -> int:
        """Evaluate text ids and image slots (from `prompt_items`) in order on the current cache;
        returns positions evaluated. Low-level (tests compare against transformers with it)."""
        self._owner = None
        n0 = self.llm.n_past
        for it in items:
            if isinstance(it, list):
                if it:
                    self.llm.eval_tokens(it)
            else:
                self.llm.eval_embeddings(embeds[-1 - it])
        return self.llm.n_past - n0

    # --- conversations ---
    def chat_session(self, *, system: str | None = None, sampling: SamplingParams = SamplingParams(),
                     max_tokens: int = 512) -> ChatSession:
        return ChatSession(self, system=system, sampling=sampling, max_tokens=max_tokens)

    def ask(self, prompt: str, images: Sequence[ImageInput] = (), *, system: str | None = None,
            max_tokens: int = 256, sampling: SamplingParams = SamplingParams()) -> Answer:
        return self.chat_session(system=system, sampling=sampling, max_tokens=max_tokens).ask(prompt, images)

    def close(self) -> None:
        self.vision.close()
        self.llm.close()
