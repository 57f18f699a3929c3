"""llava-local: train, convert and run LLaVA vision-language models locally on llama.cpp.

    import llava_local
    m = llava_local.load()                        # the embedded demo model; or load("out/"), load(hf_repo=...)
    print(m.ask("photo.jpg", "What is in the picture?"))
    s = m.chat_session()
    for piece in s.send("Describe it.", images=["photo.jpg"]):
        print(piece, end="", flush=True)
    for piece in s.send("And the colours?"):      # the image stays in the KV cache
        print(piece, end="", flush=True)
    m.ask("photo.jpg", "Describe it.", json_schema={"type": "object", ...})   # -> the parsed, validated object
"""
from __future__ import annotations

import os
from typing import Iterator

from llava_local.errors import (BackendUnavailableError, ContextOverflowError, ConversionError,  # noqa: F401
                                ImageError, LlavaLocalError, ModelFilesError, StructuredOutputError, TemplateError)

__all__ = ["load", "Model", "LlavaLocalError", "ModelFilesError", "ImageError", "ContextOverflowError",
           "StructuredOutputError"]


class Model:
    """A loaded (LLM, mmproj) pair. Not thread-safe: one conversation runs at a time."""

    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def _images(image) -> list:
        if image is None:
            return []
        if isinstance(image, (list, tuple)):
            return list(image)
        return [image]

    def ask(self, image, question: str, *, max_tokens: int = 256, temperature: float = 0.0,
            seed: int | None = None, system: str | None = None, json_schema: dict | None = None):
        """Answer one question about an image (a path, bytes, a PIL image, a list of them, or None).
        With `json_schema`, the answer is constrained to it and returned parsed and validated (a
        StructuredOutputError when max_tokens cuts it)."""
        from llava_local.runtime.grammar import JsonOutput
        from llava_local.runtime.sampling import SamplingParams
        answer = self.engine.ask(question, self._images(image), system=system, max_tokens=max_tokens,
                                 sampling=SamplingParams(temperature=temperature, seed=seed),
                                 output=JsonOutput(json_schema) if json_schema is not None else None)
        return answer.json if json_schema is not None else answer.text

    def stream(self, image, question: str, **kw) -> Iterator[str]:
        """Like ask, yielding text pieces as they are generated."""
        s = self.chat_session(**kw)
        yield from s.send(question, self._images(image))

    def chat_session(self, *, system: str | None = None, max_tokens: int = 512, temperature: float = 0.0,
                     seed: int | None = None):
        """A multi-turn conversation: `send(text, images=[...])` yields the answer's pieces."""
        from llava_local.runtime.sampling import SamplingParams
        return self.engine.chat_session(system=system, max_tokens=max_tokens,
                                        sampling=SamplingParams(temperature=temperature, seed=seed))

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(model: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None, *,
         hf_repo: str | None = None, hf_quant: str | None = None, vision_backend: str = "auto",
         n_ctx: int | None = None, gpu_layers: int | str = "auto", vision_device: str = "auto",
         threads: int | None = None, template: str | None = None, verbose: bool = False) -> Model:
    """Load a model: the embedded demo model by default, a converted directory, an LLM .gguf plus
    `mmproj`, or a Hugging Face repo of GGUF files (`hf_repo`). `gpu_layers` "auto" offloads all the
    LLM layers that fit the GPU (0 on a CPU build), `vision_device` "auto" uses the GPU when the vision
    backend can; `m.engine.placement.describe()` says what runs where and why."""
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.model_source import find_model
    from llava_local.runtime.options import EngineOptions
    pair = find_model(model, mmproj, hf_repo=hf_repo, hf_quant=hf_quant)
    return Model(Engine(pair, EngineOptions(vision_backend=vision_backend, n_ctx=n_ctx, gpu_layers=gpu_layers,
                                            vision_device=vision_device, threads=threads, template=template,
                                            verbose=verbose)))
