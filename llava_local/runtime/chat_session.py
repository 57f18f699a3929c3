"""A multi-turn conversation that keeps llama.cpp's KV cache between turns.

The conversation is rendered to one prompt string and tokenized by the prompt builder
(prompts/turns.py). The KV cache holds the tokens of a prefix of it (`kv_text`); a new turn
evaluates only what its rendering appends, then the decode loop (generate.py) answers. Images are
encoded once (the engine caches embeddings by decoded pixels + mmproj identity); each counts its
own tokens (LLaVA-1.6: by its size) in the context check made before anything is encoded.

    s = engine.chat_session()
    for piece in s.send("What is in the picture?", images=["photo.jpg"]):
        print(piece, end="")
    print(s.last.timings)
"""
from __future__ import annotations

import codecs
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from llava_local.errors import LlavaLocalError
from llava_local.image.load import LoadedImage
from llava_local.prompts.templates import IMAGE_MARKER, Message
from llava_local.prompts.turns import answer_span, check_images, user_content
from llava_local.runtime.context_fit import check_fit
from llava_local.runtime.generate import Decode, prefill
from llava_local.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from llava_local.runtime.engine import Engine, ImageInput
    from llava_local.runtime.grammar import JsonOutput

log = logging.getLogger(__name__)

SAVE_FORMAT = "llava-local-conversation"
@dataclass
class Answer:
    text: str
    tokens: list[int]
    n_prompt_tokens: int            # positions evaluated for this turn's prompt (text + image tokens)
    n_reused: int                   # positions already in the KV cache and not evaluated again
    finish_reason: str              # "stop" | "length" | "interrupted"
    timings: dict = field(default_factory=dict)
    json: object = None             # with a JsonOutput: the parsed answer, valid against its schema

    def __str__(self) -> str:
        return self.text


class ChatSession:
    def __init__(self, engine: "Engine", *, system: str | None = None,
                 sampling: SamplingParams = SamplingParams(), max_tokens: int = 512):
        self.engine = engine
        self.system = system
        self.sampling = sampling.validate()
        self.max_tokens = max_tokens
        self.messages: list[Message] = [Message("system", system)] if system is not None else []
        self.images: list[LoadedImage] = []      # in the order of the IMAGE_MARKERs in the messages
        self.image_sources: list[str] = []
        self.last: Answer | None = None
        self.totals = {"turns": 0, "prompt_tokens": 0, "reused_tokens": 0, "generated_tokens": 0}
        self._kv_text = ""
        self._stop = False

    # --- state ---
    def clear(self) -> None:
        """Forget the conversation (the engine's image-embedding cache stays)."""
        self.messages = [Message("system", self.system)] if self.system is not None else []
        self.images, self.image_sources = [], []
        self._kv_text = ""
        self.engine.release_kv(self)
        self.last = None

    def stop(self) -> None:
        """Ask a running `send` to stop after the current token (safe from a signal handler)."""
        self._stop = True

    def _claim_kv(self) -> None:
        if self.engine.claim_kv(self):
            self._kv_text = ""

    # --- one turn ---
    def send(self, text: str, images: Sequence["ImageInput"] = (), *, max_tokens: int | None = None,
             sampling: SamplingParams | None = None, output: "JsonOutput | None" = None) -> Iterator[str]:
        """Yield the answer's text pieces as they are generated; `self.last` holds the `Answer`.
        With `output` the answer is JSON kept to its schema, parsed into `Answer.json`; when it was cut
        or does not validate, StructuredOutputError comes after the turn is recorded."""
        if not text or not text.strip():
            raise LlavaLocalError("empty prompt")
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise LlavaLocalError(f"max_tokens must be >= 1, got {max_tokens}")
        eng, llm = self.engine, self.engine.llm
        sampler = eng.sampler(sampling or self.sampling, output)
        t0 = time.perf_counter()
        loaded = eng.load_images(images)                     # every image checked before any state change
        t1 = time.perf_counter()
        messages = self.messages + [Message("user", user_content(text, len(loaded)))]
        all_images = self.images + loaded
        target = eng.prompt.render(messages)
        check_images(target, len(all_images))
        self._claim_kv()
        if not target.startswith(self._kv_text):
            log.debug("prompt is not an extension of the cached prefix: re-evaluating the conversation")
            llm.reset()
            self._kv_text = ""
        delta = target[len(self._kv_text):]
        first_image = self._kv_text.count(IMAGE_MARKER)
        token_parts = eng.prompt.split(delta, at_start=llm.n_past == 0)
        n_new_images = len(token_parts) - 1
        new_images = all_images[first_image:first_image + n_new_images]
        check_fit(n_ctx=llm.n_ctx, images=eng.image_tokens(new_images), n_text=sum(map(len, token_parts)),
                  in_use=llm.n_past, reserve=1,
                  hint="raise --ctx, or /clear")   # refuse before encoding: never answer without the image
        embeds, cache_hits = eng.image_embeddings(new_images)
        t2 = time.perf_counter()
        n_reused = llm.n_past
        try:
            prefill(llm, token_parts, embeds)
        except BaseException:
            self._kv_text = "\0"       # the cache holds a partial turn: never a prefix of anything
            raise
        n_prompt = llm.n_past - n_reused
        self.messages, self.images = messages, all_images
        self.image_sources += [im.source for im in loaded]
        self._kv_text = target
        t3 = time.perf_counter()

        self._stop = False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        dec = Decode(llm, sampler, max_tokens, should_stop=lambda: self._stop)
        try:
            for tok in dec:
                piece = decoder.decode(llm.token_bytes(tok))
                if piece:
                    yield piece
        finally:  # also when the caller stops iterating: the recorded turn must match the KV cache
            exact = dec.settle()
            answer_text = llm.detokenize(dec.tokens)
            self._close_turn(answer_text, exact=exact)
        tokens = dec.tokens
        t4 = time.perf_counter()
        timings = {"image_load_s": t1 - t0, "encode_s": t2 - t1, "prefill_s": t3 - t2, "decode_s": t4 - t3,
                   "prefill_tok_per_s": n_prompt / (t3 - t2) if t3 > t2 else 0.0,
                   "decode_tok_per_s": len(tokens) / (t4 - t3) if tokens and t4 > t3 else 0.0,
                   "images_encoded": n_new_images - cache_hits, "image_cache_hits": cache_hits,
                   "vision_backend": eng.vision.name}
        self.last = Answer(answer_text.strip(), tokens, n_prompt, n_reused, dec.finish_reason, timings)
        self.totals["turns"] += 1
        self.totals["prompt_tokens"] += n_prompt
        self.totals["reused_tokens"] += n_reused
        self.totals["generated_tokens"] += len(tokens)
        if output is not None:   # the turn is recorded: a cut or invalid answer leaves the session usable
            self.last.json = output.parse(self.last.text, dec.finish_reason)

    def _close_turn(self, answer_text: str, exact: bool = True) -> None:
        """Record the answer and evaluate what the template puts after an answer (e.g. "</s>"), so
        the next turn's rendering extends the cache. The cache keeps the tokens the model generated
        (as llama.cpp's server does), even where re-rendering the answer would tokenize differently."""
        llm, prompt_builder = self.engine.llm, self.engine.prompt
        asked = self.messages
        self.messages = asked + [Message("assistant", answer_text.strip())]
        span = answer_span(prompt_builder, asked, answer_text.strip()) if exact else None
        toks = prompt_builder.tokenize(span[1], at_start=False) if span is not None else []
        if span is None or llm.n_past + len(toks) > llm.n_ctx:
            self._kv_text = "\0"   # cannot extend exactly: the next turn re-evaluates from scratch
            return
        if toks:
            llm.eval_tokens(toks)
        self._kv_text = self._kv_text + span[0] + span[1]

    def ask(self, text: str, images: Sequence["ImageInput"] = (), **kw) -> Answer:
        for _ in self.send(text, images, **kw):
            pass
        assert self.last is not None
        return self.last

    # --- persistence ---
    def to_json(self) -> dict:
        return {"format": SAVE_FORMAT, "version": 1, "template": self.engine.format.name,
                "messages": [{"role": m.role, "content": m.content} for m in self.messages],
                "images": list(self.image_sources)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved one; its images are loaded again (and re-encoded
        only if not in the embedding cache). The KV cache is rebuilt on the next turn."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise LlavaLocalError(f"{path}: cannot read conversation ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
            raise LlavaLocalError(f"{path}: not a llava-local conversation file")
        try:
            messages = [Message(str(m["role"]), str(m["content"])) for m in data["messages"]]
            sources = [str(s) for s in data.get("images", [])]
        except (KeyError, TypeError) as exc:
            raise LlavaLocalError(f"{path}: malformed conversation ({exc})") from None
        n_markers = sum(m.content.count(IMAGE_MARKER) for m in messages)
        if n_markers != len(sources):
            raise LlavaLocalError(f"{path}: {n_markers} image markers but {len(sources)} images")
        loaded = self.engine.load_images(sources)
        self.clear()
        self.messages, self.images, self.image_sources = messages, loaded, sources
        self.system = messages[0].content if messages and messages[0].role == "system" else None
