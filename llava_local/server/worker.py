"""The server's engine process: one Engine, up to `parallel` conversations decoded together.

llama.cpp answers some faults with `abort()`; the HTTP server must outlive that, so the engine runs
in a spawned process (engine_process.py starts and restarts it) and this module is its main loop:

    # in the child (multiprocessing, spawn): serve_worker_main(conn, cfg, pair)
    #   <- ("req", rid, ChatRequest) | ("cancel", rid) | ("stop",)
    #   -> ("ready", info) | ("fatal", message)
    #   -> ("delta", rid, text) ... then ("done", rid, result) | ("error", rid, http_status, message)

Requests wait in arrival order until a sequence (slot) and KV room are free; each is rendered by the
prompt builder and given the free slot whose cache holds the longest prefix of it (the same
conversation's last turn: runtime/conversations.py), so only its new text and new images are
evaluated. Images are encoded once (the engine's embedding cache); each counts its own tokens
(LLaVA-1.6: by its size) in the prompt limit, the fit check and its conversation segment. Every
admitted sequence decodes in the same llama.cpp batch (runtime/batch_decode.py); an idle slot keeps
its conversation's cells until their room is needed (least recently used first).
"""
from __future__ import annotations

import codecs
import logging
import os
import signal
import sys
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from llava_local.errors import LlavaLocalError, StructuredOutputError
from llava_local.logs import setup_logging
from llava_local.procs import die_with_parent
from llava_local.prompts.templates import IMAGE_MARKER, Message
from llava_local.runtime.options import EngineOptions
from llava_local.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineOptions           # n_ctx: the KV cells all sequences share; n_seq_max: `parallel`
    max_prompt_tokens: int          # a request's prompt (text + image positions) at most


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]   # (role, content with IMAGE_MARKER where each image goes)
    images: tuple                           # LoadedImage per IMAGE_MARKER, in order
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    response: str = "text"                  # text | json_object | json_schema
    schema: dict | None = None              # with response == "json_schema"
    stream: bool = False                    # send ("delta", ...) as the answer grows


class TextStream:
    """An answer's text as tokens arrive: UTF-8 pieces joined, leading whitespace dropped, text that
    may be the start of a stop string held back, and the answer cut where a stop string appears."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> bool:
        """Add a token's bytes; True when a stop string completed (the text ends before it)."""
        self.text += self._utf8.decode(data)
        if not self.sent:
            self.text = self.text.lstrip()
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                self.text, self.stopped = self.text[:i], True
        return self.stopped

    def ready(self) -> str:
        """Text that can be sent now (none of it can turn out to begin a stop string)."""
        hold = 0
        if not self.stopped:
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if s.startswith(self.text[-k:]):
                        hold = k
                        break
        end = len(self.text) - hold
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def finish(self) -> str:
        """The rest of the text; `self.text` is then the whole answer (trailing whitespace dropped)."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        self.text = self.text[:max(self.sent, len(self.text.rstrip()))]
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece


@dataclass
class _Running:
    rid: str
    req: ChatRequest
    messages: list[Message]
    slot: int
    segments: list                   # the slot's segments once the prompt is evaluated
    stream: TextStream
    output: object | None            # JsonOutput
    n_prompt: int                    # the whole prompt's positions
    n_reused: int                    # of which already in the cache
    images_encoded: int
    image_cache_hits: int
    t_admit: float
    t_first: float = 0.0


class ServeWorker:
    def __init__(self, cfg: ServeConfig, pair: ModelPair, send):
        from llava_local.runtime.batch_decode import BatchDecoder
        from llava_local.runtime.conversations import ConversationCache
        from llava_local.runtime.engine import Engine

        self.cfg, self.send = cfg, send
        self.engine = Engine(pair, cfg.engine)
        self.n_slots = cfg.engine.n_seq_max
        self.decoder = BatchDecoder(self.engine.llm, [], n_seq=self.n_slots)
        self.cache = ConversationCache(self.n_slots)
        self.waiting: deque[tuple[str, ChatRequest]] = deque()
        self.running: dict[str, _Running] = {}
        # on the CPU the vision encoder runs beside the decode loop: a long encode (seconds) does not
        # stall the answers being generated; the request waits at the head of the queue meanwhile.
        # On a GPU it takes milliseconds and runs in the loop (no second thread on the device).
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="vision") \
            if self.engine.placement.vision_device == "cpu" else None
        self.encoding: tuple[str, list, Future] | None = None   # (request id, images, their embeddings)
        self.pre_encoded: dict[str, int] = {}                    # request id -> images encoded for it
        pl = self.engine.placement
        self.info = {"vision_backend": self.engine.vision.name, "vision_device": pl.vision_device,
                     "llm_device": pl.llm_device, "gpu_layers": pl.gpu_layers, "parallel": self.n_slots,
                     "n_ctx": self.engine.llm.n_ctx, "template": self.engine.format.name, "pid": os.getpid()}

    # --- the loop ---
    def serve(self, conn) -> None:
        while True:
            wait = 0 if self.decoder.active else 0.005 if self.waiting else None   # an encode may be running
            if conn.poll(wait):
                while True:
                    msg = conn.recv()
                    if msg[0] == "stop":
                        return
                    self._handle(msg)
                    if not conn.poll(0):
                        break
            self._admit()
            if self.decoder.active:
                self._step()

    def _handle(self, msg) -> None:
        if msg[0] == "req":
            self.waiting.append((msg[1], msg[2]))
        elif msg[0] == "cancel":
            rid = msg[1]
            self.waiting = deque(w for w in self.waiting if w[0] != rid)
            self.pre_encoded.pop(rid, None)
            if rid in self.running:
                result = self.decoder.cancel(rid)
                run = self.running.pop(rid)
                if result is not None:
                    self.cache.record(run.slot, run.segments)   # the prompt stays usable; the partial answer does not
                log.info("request %s cancelled after %d tokens", rid, len(result.tokens) if result else 0)

    def _fail(self, rid: str, status: int, message: str) -> None:
        self.send(("error", rid, status, message))

    # --- admission ---
    def _collect_encoded(self) -> None:
        """Cache the embeddings the encoder thread finished (or fail their request)."""
        rid, images, fut = self.encoding
        if not fut.done():
            return
        self.encoding = None
        try:
            self.engine.cache_embeddings(images, fut.result())
            self.engine.n_images_encoded += len(images)
            self.pre_encoded[rid] = self.pre_encoded.get(rid, 0) + len(images)
        except Exception as exc:               # the encoder failed on these images: their request fails
            log.error("request %s: encoding failed: %s", rid, traceback.format_exc())
            self.waiting = deque(w for w in self.waiting if w[0] != rid)
            self.pre_encoded.pop(rid, None)
            self._fail(rid, 500, f"encoding the image failed: {type(exc).__name__}: {exc}")

    def _admit(self) -> None:
        if self.encoding is not None:
            self._collect_encoded()
        while self.waiting and self.decoder.free:
            rid, req = self.waiting[0]
            try:
                admitted = self._try_admit(rid, req)
            except LlavaLocalError as exc:     # the request's fault: too long, bad image, context too small
                self._drop_head(rid, 400, str(exc))
                continue
            except Exception as exc:           # a bug: this request fails, the server goes on
                log.error("request %s: %s", rid, traceback.format_exc())
                self._drop_head(rid, 500, f"{type(exc).__name__}: {exc}")
                continue
            if not admitted:
                return                          # waits for room (first come, first served)
            self.waiting.popleft()

    def _drop_head(self, rid: str, status: int, message: str) -> None:
        self.waiting.popleft()
        self.pre_encoded.pop(rid, None)
        self._fail(rid, status, message)

    def _try_admit(self, rid: str, req: ChatRequest) -> bool:
        from llava_local.prompts.turns import check_images
        from llava_local.runtime.batch_decode import SeqRequest
        from llava_local.runtime.context_fit import check_fit
        from llava_local.runtime.conversations import Segment

        eng = self.engine
        messages = [Message(r, c) for r, c in req.messages]
        target = eng.prompt.render(messages)
        check_images(target, len(req.images))
        keys = eng.image_keys(req.images)
        slot, kept = self.cache.choose(target, keys, self.decoder.free)
        delta = target[kept.chars:]
        pieces = eng.prompt.pieces(delta, at_start=kept.positions == 0)
        token_parts = [ids for _, ids in pieces]
        token_parts[0] = list(kept.pending) + token_parts[0]    # the rest of an answer cut at max_tokens
        new_images = list(req.images[kept.images:kept.images + len(token_parts) - 1])
        n_tok = eng.image_tokens(new_images)                # each image's positions, from its size
        n_prompt = kept.positions + sum(map(len, token_parts)) + sum(n_tok)
        if n_prompt > self.cfg.max_prompt_tokens:
            flag = "--ctx" if self.cfg.max_prompt_tokens >= self.engine.llm.n_ctx else "--max-prompt-tokens"
            new = f" (new images: {' + '.join(map(str, n_tok))})" if n_tok else ""
            raise LlavaLocalError(f"the prompt is {n_prompt} tokens{new}, over this server's limit of "
                                  f"{self.cfg.max_prompt_tokens} ({flag})")
        # with answers being generated, encode beside them and come back; alone, encode here (a
        # thread of its own runs torch's encoder ~10 % slower: bench/server_multiturn.py, request 1)
        uncached = eng.uncached(new_images) if self.encoder is not None and self.decoder.active else []
        if uncached:
            if self.encoding is None:
                self.encoding = (rid, uncached, self.encoder.submit(eng.vision.embed, [im.image for im in uncached]))
            return False
        placeholders = [np.empty((n, 0), np.float32) for n in n_tok]   # sizes only, for the fit check
        seq = SeqRequest(rid, _interleave(token_parts, placeholders), None, req.max_tokens, slot=slot,
                         start=kept.positions, keep=True)
        if not self._make_room(seq):
            if self.decoder.active:
                return False
            check_fit(n_ctx=self.engine.llm.n_ctx, in_use=kept.positions, images=n_tok,
                      n_text=sum(map(len, token_parts)), n_answer=req.max_tokens,
                      hint="raise --ctx or lower max_tokens")   # alone and too big: the error says by how much
            raise LlavaLocalError("the request does not fit the KV cache")
        t0 = time.perf_counter()
        embeds, hits = eng.image_embeddings(new_images)      # all cached by now
        encoded = self.pre_encoded.pop(rid, 0)
        output = _output(req)
        run = _Running(rid, req, messages, slot, [], TextStream(req.stop), output, n_prompt, kept.positions,
                       len(new_images) - hits + encoded, hits - encoded, t0)
        seq.parts = _interleave(token_parts, embeds)
        seq.sampler = eng.sampler(req.sampling, output)
        seq.on_token = lambda tok, run=run: self._on_token(run, tok)
        self.decoder.admit(seq)
        segs = list(kept.segments)
        if kept.pending:
            segs[-1] = replace(segs[-1], n=segs[-1].n + len(kept.pending), pending=())
        for i, (text, ids) in enumerate(pieces):
            if i:
                segs.append(Segment(IMAGE_MARKER, n_tok[i - 1], image=keys[kept.images + i - 1]))
            if ids:
                segs.append(Segment(text, len(ids)))
        run.segments = segs
        self.cache.record(slot, segs)
        self.running[rid] = run
        return True

    def _make_room(self, seq) -> bool:
        """Free idle slots' cells, least recently used first, until `seq` fits; False if it cannot."""
        dec = self.decoder
        for s in self.cache.idle_order(s for s in dec.held if s != seq.slot):
            if dec.fits(seq):
                break
            dec.evict(s)
            self.cache.forget(s)
        return dec.fits(seq)

    # --- decoding ---
    def _on_token(self, run: _Running, tok: int) -> bool:
        if not run.t_first:
            run.t_first = time.perf_counter()
        stop = run.stream.feed(self.engine.llm.token_bytes(tok))
        if run.req.stream:
            piece = run.stream.ready()
            if piece:
                self.send(("delta", run.rid, piece))
        return stop

    def _step(self) -> None:
        try:
            results = self.decoder.step()
        except Exception as exc:   # llama_decode failed: every running request fails, the state restarts
            log.error("decode step failed: %s", traceback.format_exc())
            for rid in list(self.running):
                self._fail(rid, 500, f"decoding failed: {exc}")
            self.running.clear()
            self.decoder.reset()
            self.cache.forget()
            return
        for r in results:
            run = self.running.pop(r.key, None)
            if run is not None:
                self._finish(run, r)

    def _finish(self, run: _Running, r) -> None:
        from llava_local.prompts.turns import answer_span
        from llava_local.runtime.conversations import Segment

        tail = run.stream.finish()
        text = run.stream.text
        in_cache = r.n_cached - r.prompt_end        # the answer's tokens in the cache: all, or all but the last
        if r.finish_reason in ("stop", "length") and not run.stream.stopped and \
                0 <= len(r.tokens) - in_cache <= 1:
            span = answer_span(self.engine.prompt, run.messages, text)
            if span is not None:   # the next turn of this conversation extends the answer's cells
                run.segments = run.segments + [Segment(span[0], in_cache, pending=tuple(r.tokens[in_cache:]))]
        self.cache.record(run.slot, run.segments)
        parsed = None
        if run.output is not None:
            try:
                parsed = run.output.parse(text, r.finish_reason)
            except StructuredOutputError as exc:
                return self._fail(run.rid, 400, str(exc))
        if run.req.stream and tail:
            self.send(("delta", run.rid, tail))
        now = time.perf_counter()
        self.send(("done", run.rid, {
            "text": text, "json": parsed, "finish_reason": r.finish_reason, "prompt_tokens": run.n_prompt,
            "cached_tokens": run.n_reused, "completion_tokens": len(r.tokens),
            "images_encoded": run.images_encoded, "image_cache_hits": run.image_cache_hits,
            "prefill_evaluated": r.n_prompt, "decode_s": now - (run.t_first or now), "seconds": now - run.t_admit}))

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.shutdown(wait=True)
        self.engine.close()


def _interleave(token_parts: list[list[int]], images: list) -> list:
    out: list = []
    for i, ids in enumerate(token_parts):
        if i:
            out.append(images[i - 1])
        out.append(ids)
    return out


def _output(req: ChatRequest):
    if req.response == "text":
        return None
    from llava_local.runtime.grammar import JsonOutput
    return JsonOutput(req.schema) if req.response == "json_schema" else JsonOutput.json_object()


def serve_worker_main(conn, cfg: ServeConfig, pair: ModelPair) -> None:
    """Entry point of the engine process; `pair` was resolved by the server (plain data)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the server's to handle
    die_with_parent()
    setup_logging(cfg.engine.verbose)
    try:
        worker = ServeWorker(cfg, pair, conn.send)
    except BaseException as exc:     # the server must say why, not hang
        conn.send(("fatal", str(exc) if isinstance(exc, LlavaLocalError) else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", worker.info))
    try:
        worker.serve(conn)
    except (EOFError, OSError):      # the server went away
        pass
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        os._exit(3)
    worker.close()

