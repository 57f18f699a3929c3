"""The engine: a validated (LLM, mmproj) pair, a vision backend, and generation on llama.cpp.

    engine = Engine(resolve_pair("out/"), EngineOptions(vision_backend="torch", n_ctx=4096))
    answer = engine.ask("What is in the picture?", ["photo.jpg"], max_tokens=64)
    print(answer.text, answer.timings)

Images become embeddings (vision backend), the conversation becomes token ids around the images
(prompts/turns.py, the one prompt builder), and both are fed to llama.cpp in order (llm.py).
Each image has its own token count: 576 for every LLaVA-1.5 image, 576 to 2928 for a LLaVA-1.6
("anyres") one by its size (`image_tokens`; `--image-max-tiles` bounds it), checked against the
context before anything is encoded or evaluated.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from typing import Sequence

import numpy as np
from PIL import Image

from llava_local.errors import BackendUnavailableError
from llava_local.image.load import LoadedImage, load_image
from llava_local.prompts.render import choose_format
from llava_local.prompts.templates import IMAGE_MARKER, Message
from llava_local.prompts.turns import PromptBuilder
from llava_local.runtime.chat_session import Answer, ChatSession  # noqa: F401  (Answer: re-exported)
from llava_local.runtime.generate import prefill
from llava_local.runtime.grammar import Grammar, JsonOutput
from llava_local.runtime.llm import LlamaLLM
from llava_local.runtime.model_pair import ModelPair, check_context, default_context
from llava_local.runtime.options import EngineOptions
from llava_local.runtime.placement import backend_can_use_gpu, backend_order, resolve_placement
from llava_local.runtime.sampling import Sampler, SamplingParams
from llava_local.vision import VisionOptions, create_backend

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | bytes | Image.Image | LoadedImage
EMBED_CACHE_SIZE = 64                    # images whose embeddings are kept at most ...
EMBED_CACHE_BYTES = 64 * 576 * 4096 * 4  # ... and their bytes: 64 LLaVA-1.5-7B images (9.4 MB each), 12 1.6 ones


class Engine:
    """`options` (EngineOptions) says how to run the pair; fields given as keywords override it.
    "auto" placement is resolved once by placement.resolve_placement (the GPU when there is one;
    exact vision backends only); the workload tells it which backend starts or runs fastest."""

    def __init__(self, pair: ModelPair, options: EngineOptions | None = None, **fields):
        self.pair = pair
        o = dataclasses.replace(options or EngineOptions(), **fields).validate()
        if o.n_ctx is None:
            o = dataclasses.replace(o, n_ctx=default_context(pair, o.image_max_tiles))
        self.options = o
        check_context(pair, o.n_ctx, max_tiles=o.image_max_tiles)   # the largest image fits
        self.placement = resolve_placement(pair, gpu_layers=o.gpu_layers, vision_backend=o.vision_backend,
                                           vision_device=o.vision_device, n_ctx=o.n_ctx, workload=o.workload)
        self.llm = LlamaLLM(pair.llm_path, n_ctx=o.n_ctx, n_gpu_layers=self.placement.gpu_layers,
                            n_threads=o.threads, all_logits=o.all_logits, precise=o.precise, n_seq_max=o.n_seq_max,
                            extra_bufts=o.extra_bufts, verbose=o.verbose)
        self.vision = self._make_backend(o.vision_backend == "auto")
        bos = self.llm.bos
        self.format = choose_format(override=o.template, gguf_template=pair.chat_template, named=pair.template_name,
                                    bos_text=self.llm.token_text(bos) if bos is not None else "",
                                    eos_text=self.llm.token_text(self.llm.eos))
        self.prompt = PromptBuilder(self.format, self.llm.tokenize, bos)
        self.n_images_encoded = 0
        self._embed_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        st = pair.mmproj_path.stat()
        self._mmproj_id = f"{pair.mmproj_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if pair.anyres:   # the tiling decides the embeddings as much as the pixels do
            self._mmproj_id += f":tiles<={o.image_max_tiles or 'all'}"
        self.kv_owner: object | None = None     # the session whose turns are in the KV cache
        log.info("%s; prompt format: %s", self.placement.describe(), self.format.name)

    def _make_backend(self, auto: bool):
        """The resolved backend; when it was chosen automatically and cannot load this file, the next
        exact one (never llama.cpp's inexact clip graph: that only on request)."""
        p = self.placement
        o = self.options
        names = [p.vision_backend] + ([n for n in backend_order(o.workload, p.vision_device == "gpu")
                                       if n != p.vision_backend] if auto else [])
        errors = []
        for n in names:
            device = p.vision_device if backend_can_use_gpu(n, p.gpu) else "cpu"
            try:
                backend = create_backend(n, self.pair.mmproj,
                                         VisionOptions(device=device, threads=o.threads, workload=o.workload,
                                                       verbose=o.verbose, max_tiles=o.image_max_tiles),
                                         llm=self.llm)
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

    def image_keys(self, images: Sequence[LoadedImage]) -> list[str]:
        """Each image's embedding-cache key: the mmproj's identity (with the tiling, for LLaVA-1.6)
        and the decoded pixels."""
        return [f"{self._mmproj_id}:{im.pixel_hash}" for im in images]

    def image_tokens(self, images: Sequence[LoadedImage | Image.Image]) -> list[int]:
        """Each image's token count, from its size alone (nothing is encoded): what the context
        checks count before any prefill."""
        return [self.vision.tokens_for(*(im.image if isinstance(im, LoadedImage) else im).size) for im in images]

    def uncached(self, images: Sequence[LoadedImage]) -> list[LoadedImage]:
        """The images whose embeddings are not cached, one per distinct picture."""
        todo: dict[str, LoadedImage] = {}
        for k, im in zip(self.image_keys(images), images):
            if k not in self._embed_cache:
                todo.setdefault(k, im)
        return list(todo.values())

    def cache_embeddings(self, images: Sequence[LoadedImage], embeds: Sequence[np.ndarray]) -> None:
        """Keep (n_tokens_i, n_embd) embeddings of `images` (encoded elsewhere, e.g. in a thread)."""
        for k, e in zip(self.image_keys(images), embeds):
            self._embed_cache[k] = e
            self._embed_cache.move_to_end(k)

    def image_embeddings(self, images: Sequence[LoadedImage]) -> tuple[list[np.ndarray], int]:
        """(n_tokens_i, n_embd) per image, from the cache where possible; returns (embeddings, cache hits)."""
        todo = self.uncached(images)
        if todo:
            self.cache_embeddings(todo, self.encode_images([im.image for im in todo]))
        out = []
        for k in self.image_keys(images):
            self._embed_cache.move_to_end(k)
            out.append(self._embed_cache[k])
        keep = len(set(self.image_keys(images)))   # never evict what this call returns
        while len(self._embed_cache) > keep and (len(self._embed_cache) > EMBED_CACHE_SIZE or
                                                 sum(e.nbytes for e in self._embed_cache.values()) > EMBED_CACHE_BYTES):
            self._embed_cache.popitem(last=False)
        return out, len(images) - len(todo)

    def encode_images(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """One (n_tokens_i, n_embd) float32 array per image (LLaVA-1.6: base + tiles + row newlines)."""
        if not images:
            return []
        out = self.vision.embed(images)
        self.n_images_encoded += len(images)
        return out

    def prompt_items(self, messages: Sequence[Message]) -> list[list[int] | int]:
        """The prompt builder's ids for `messages` (with a generation prompt) as prefill items: lists
        of token ids, and -1 - i for the i-th image's slot."""
        n_images = sum(m.content.count(IMAGE_MARKER) for m in messages)
        items: list[list[int] | int] = []
        for i, ids in enumerate(self.prompt.parts(messages, n_images=n_images)):
            if i:
                items.append(-i)
            items.append(ids)
        return items

    def prefill(self, items, embeds: Sequence[np.ndarray]) -> int:
        """Evaluate text ids and image slots (from `prompt_items`; `embeds`: one (n_tokens_i, n_embd)
        array per image) in order on the current cache; returns positions evaluated. Low-level (tests
        compare against transformers with it)."""
        self.kv_owner = None
        texts: list[list[int]] = [[]]
        images = []
        for it in items:
            if isinstance(it, list):
                texts[-1] = texts[-1] + it
            else:
                images.append(embeds[-1 - it])
                texts.append([])
        return prefill(self.llm, texts, images)

    # --- conversations ---
    def sampler(self, params: SamplingParams, output: JsonOutput | None = None) -> Sampler:
        """A sampler for one answer; with `output`, kept to its JSON schema by a grammar of its own."""
        return Sampler(params, Grammar(self.llm, output.gbnf) if output is not None else None)

    def claim_kv(self, owner: object) -> bool:
        """Make `owner` (a chat session) the holder of the LLM's KV cache; True when it held another
        conversation, which is then cleared."""
        if self.kv_owner is owner:
            return False
        self.llm.reset()
        self.kv_owner = owner
        return True

    def release_kv(self, owner: object) -> None:
        """Clear the KV cache if `owner` holds it."""
        if self.kv_owner is owner:
            self.llm.reset()

    def chat_session(self, *, system: str | None = None, sampling: SamplingParams = SamplingParams(),
                     max_tokens: int = 512) -> ChatSession:
        return ChatSession(self, system=system, sampling=sampling, max_tokens=max_tokens)

    def ask(self, prompt: str, images: Sequence[ImageInput] = (), *, system: str | None = None,
            max_tokens: int = 256, sampling: SamplingParams = SamplingParams(),
            output: JsonOutput | None = None) -> Answer:
        """One answer in a fresh session; with `output`, JSON valid against its schema (`Answer.json`)."""
        return self.chat_session(system=system, sampling=sampling, max_tokens=max_tokens).ask(prompt, images,
                                                                                            output=output)

    def close(self) -> None:
        self.vision.close()
        self.llm.close()
