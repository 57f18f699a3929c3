"""The engine: a validated (LLM, mmproj) pair, a vision backend, and generation on llama.cpp.

    engine = Engine(resolve_pair("out/"), vision_backend="torch")
    answer = engine.ask("What is in the picture?", ["photo.jpg"], max_tokens=64)
    print(answer.text, answer.timings)

Images become embeddings (vision backend), the prompt becomes template segments
(templates.py), and both are fed to llama.cpp in order through `llama_batch` (llm.py).
"""
from __future__ import annotations

import codecs
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .errors import BackendUnavailableError, LlavaLocalError
from .images import LoadedImage, load_image
from .llm import LlamaLLM
from .model_pair import ModelPair, check_context
from .sampling import Sampler, SamplingParams
from .templates import DEFAULT_TEMPLATE, IMAGE_MARKER, Message, get_template, tokenize_segments
from .vision import create_backend

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | bytes | Image.Image | LoadedImage
DEFAULT_CTX = 4096
BACKEND_PREFERENCE = ("torch", "mtmd")   # "auto": the most faithful backend that can run here


@dataclass
class Answer:
    text: str
    tokens: list[int]
    n_prompt_tokens: int            # text + image positions evaluated for the prompt
    finish_reason: str              # "stop" | "length"
    timings: dict = field(default_factory=dict)


def user_content(prompt: str, n_images: int) -> str:
    """LLaVA puts the image before the question: "<image>\\nQ". Explicit markers are respected."""
    n_markers = prompt.count(IMAGE_MARKER)
    if n_markers == 0:
        return (IMAGE_MARKER + "\n") * n_images + prompt
    if n_markers != n_images:
        raise LlavaLocalError(f"the prompt has {n_markers} {IMAGE_MARKER} markers but {n_images} images were given")
    return prompt


class Engine:
    def __init__(self, pair: ModelPair, *, vision_backend: str = "auto", n_ctx: int | None = None, n_gpu_layers: int = 0,
                 vision_device: str = "cpu", threads: int | None = None, template: str | None = None,
                 all_logits: bool = False, precise: bool = False, verbose: bool = False):
        self.pair = pair
        if n_ctx is None:  # LLaVA-1.5 trains at 4096; never default past what the LLM was trained for
            n_ctx = min(DEFAULT_CTX, pair.n_ctx_train or DEFAULT_CTX)
        check_context(pair, n_ctx)
        self.template = get_template(template or pair.template_name or DEFAULT_TEMPLATE)
        self.llm = LlamaLLM(pair.llm_path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=threads,
                            all_logits=all_logits, precise=precise, verbose=verbose)
        self.vision = self._make_backend(vision_backend, vision_device=vision_device, threads=threads, verbose=verbose)
        self.n_images_encoded = 0
        log.info("vision backend: %s", self.vision.name)

    def _make_backend(self, name: str, **kw):
        names = BACKEND_PREFERENCE if name == "auto" else (name,)
        errors = []
        for n in names:
            try:
                return create_backend(n, self.pair.mmproj, llm=self.llm, **kw)
            except BackendUnavailableError as exc:
                if name != "auto":
                    raise
                log.info("vision backend %s unavailable: %s", n, exc)
                errors.append(str(exc))
        raise BackendUnavailableError("no vision backend can run here: " + "; ".join(errors))

    # --- pieces ---
    def load_images(self, images: Sequence[ImageInput]) -> list[Image.Image]:
        out = []
        for im in images:
            out.append(im.image if isinstance(im, LoadedImage) else load_image(im).image)
        return out

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
        """Evaluate text ids and image slots in order; returns positions evaluated."""
        n0 = self.llm.n_past
        for it in items:
            if isinstance(it, list):
                if it:
                    self.llm.eval_tokens(it)
            else:
                self.llm.eval_embeddings(embeds[-1 - it])
        return self.llm.n_past - n0

    def generate(self, sampling: SamplingParams, max_tokens: int) -> Iterator[tuple[int, str]]:
        """Yield (token, text piece) until an end-of-generation token, max_tokens or a full context."""
        sampler = Sampler(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        history: list[int] = []
        for _ in range(max_tokens):
            tok = sampler(self.llm.last_logits(), history)
            if self.llm.is_eog(tok):
                return
            history.append(tok)
            yield tok, decoder.decode(self.llm.token_bytes(tok))
            if self.llm.n_past >= self.llm.n_ctx:
                return
            self.llm.eval_tokens([tok])

    # --- one-shot ---
    def ask(self, prompt: str, images: Sequence[ImageInput] = (), *, system: str | None = None,
            max_tokens: int = 256, sampling: SamplingParams = SamplingParams()) -> Answer:
        pieces: list[str] = []
        answer = None
        for item in self.stream(prompt, images, system=system, max_tokens=max_tokens, sampling=sampling):
            if isinstance(item, Answer):
                answer = item
            else:
                pieces.append(item)
        assert answer is not None
        return answer

    def stream(self, prompt: str, images: Sequence[ImageInput] = (), *, system: str | None = None,
               max_tokens: int = 256, sampling: SamplingParams = SamplingParams()):
        """Yield text pieces as they are generated, then the final `Answer`."""
        if not prompt.strip():
            raise LlavaLocalError("empty prompt")
        if max_tokens < 1:
            raise LlavaLocalError(f"max_tokens must be >= 1, got {max_tokens}")
        sampling.validate()
        t0 = time.perf_counter()
        pil = self.load_images(images)
        t1 = time.perf_counter()
        messages = ([Message("system", system)] if system is not None else []) + \
            [Message("user", user_content(prompt, len(pil)))]
        items = self.prompt_items(messages)
        n_text = sum(len(it) for it in items if isinstance(it, list))
        check_context(self.pair, self.llm.n_ctx, n_images=len(pil), n_text=n_text)  # before any encoding
        embeds = self.encode_images(pil)
        t2 = time.perf_counter()
        self.llm.reset()
        n_prompt = self.prefill(items, embeds)
        t3 = time.perf_counter()
        tokens: list[int] = []
        for tok, piece in self.generate(sampling, max_tokens):
            tokens.append(tok)
            if piece:
                yield piece
        t4 = time.perf_counter()
        finish = "length" if len(tokens) >= max_tokens or self.llm.n_past >= self.llm.n_ctx else "stop"
        timings = {"image_load_s": t1 - t0, "encode_s": t2 - t1, "prefill_s": t3 - t2, "decode_s": t4 - t3,
                   "decode_tok_per_s": (len(tokens) / (t4 - t3)) if tokens and t4 > t3 else 0.0,
                   "vision_backend": self.vision.name}
        yield Answer(self.llm.detokenize(tokens), tokens, n_prompt, finish, timings)

    def close(self) -> None:
        self.vision.close()
        self.llm.close()
