"""The caption worker: the engine in a process of its own, captioning the items it is sent.

llama.cpp answers some faults with `abort()`, a bad image can crash a decoder, the OOM killer picks
the biggest process: none of that may end a 100,000-image job, so the engine runs in a spawned
process that the supervisor (supervisor.py) restarts. This module is what runs in that process:

    cfg = resolve_worker(WorkerConfig(llm_path=..., mmproj_path=..., prompt="...", parallel=8), pair)
    # in the child (multiprocessing, spawn): worker_main(conn, cfg, pair)
    #   <- ("items", [CaptionItem, ...]) | ("stop",)
    #   -> ("ready", info) | ("fatal", message) | ("record", record) | ("died", message) | ("stats", {...})

Images are decoded and squared (LLaVA-1.5's pad + resize; a LLaVA-1.6 image stays as it is, the
backend tiles it) by a thread pool, encoded by the vision backend in batches, and captioned by
`BatchDecoder` (`parallel` sequences per llama.cpp batch, the prompt prefix shared in the KV cache).
Each image is admitted by its own token count (a 1.6 image takes 576 to 2928 by its size); the
default context is sized for `parallel` of the largest. `resolve_worker` decides "auto" placement
in the job's process, so that the records and every restarted worker name and run the same thing. With
`json_schema` every sequence samples through a grammar of its own and its record carries the parsed
object ("json"); an answer cut by max_tokens or not valid against the schema is an error record.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from llava_local.errors import LlavaLocalError, StructuredOutputError
from llava_local.logs import setup_logging
from llava_local.procs import die_with_parent
from llava_local.runtime.options import EngineOptions
from llava_local.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionItem:
    key: str                    # the record's identity (resume, shards)
    path: str                   # where the image is read from (with `data`: where those bytes came from)
    data: bytes | None = None   # the file's bytes, when the job has them already (a Ray Dataset's row)


@dataclass(frozen=True)
class WorkerConfig:
    llm_path: str
    mmproj_path: str
    prompt: str
    system: str | None = None
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 128
    parallel: int = 4               # sequences decoded together (the engine's n_seq_max)
    io_threads: int = 2             # image decoding + squaring threads
    # placement ("auto" values: decided by resolve_worker before the job starts), threads, template,
    # verbose; n_ctx None: room for `parallel` full answers (see _context_size). The worker sets
    # n_seq_max (= parallel) and workload ("batch") itself.
    engine: EngineOptions = EngineOptions()
    ignore_eos: bool = False        # benchmarks: every caption runs to max_tokens (batch_decode.py)
    json_schema: dict | None = None  # answers kept to this JSON schema (runtime/grammar.py); records carry "json"


def item_seed(seed: int | None, key: str) -> int | None:
    """A per-image seed: a seeded job gives each image the same answer whatever it is batched with."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def _context_size(cfg: WorkerConfig, image_tokens: int) -> int:
    """KV cells for `parallel` sequences: the prefix once, then image (`image_tokens`: the largest
    image's) + question + answer each.
    Text is bounded by its UTF-8 bytes (a token is at least one byte); the decoder admits by the
    real token counts, so a too-small context lowers the parallelism instead of failing."""
    text = len((cfg.prompt + (cfg.system or "")).encode()) + 512   # + template text and default system prompt
    return text + cfg.parallel * (image_tokens + len(cfg.prompt.encode()) + 64 + cfg.max_tokens)


def resolve_worker(cfg: WorkerConfig, pair: ModelPair | None = None) -> WorkerConfig:
    """The config with "auto" placement (GPU layers, vision backend and device) of `cfg.engine`
    decided here, in the job's process, by placement.resolve_placement: records and their
    fingerprint then name what actually runs, and every restarted worker runs the same. `pair`:
    the config's files, if the caller has resolved them already."""
    e = cfg.engine
    if "auto" not in (e.vision_backend, e.vision_device, e.gpu_layers) and e.gpu_layers != "all":
        return cfg
    from llava_local.runtime.placement import resolve_placement
    if pair is None:
        from llava_local.runtime.model_pair import resolve_pair
        pair = resolve_pair(cfg.llm_path, cfg.mmproj_path)
    p = resolve_placement(pair, gpu_layers=e.gpu_layers, vision_backend=e.vision_backend,
                          vision_device=e.vision_device,
                          n_ctx=e.n_ctx or _context_size(cfg, pair.max_image_tokens(e.image_max_tiles)),
                          workload="batch")
    log.info("caption worker: %s", p.describe())
    return replace(cfg, engine=replace(e, vision_backend=p.vision_backend, vision_device=p.vision_device,
                                       gpu_layers=p.gpu_layers))


def caption_messages(cfg: WorkerConfig) -> list:
    """The conversation asked about every image: the system prompt if any, then the image and the prompt."""
    from llava_local.prompts.templates import Message
    from llava_local.prompts.turns import user_content
    return ([Message("system", cfg.system)] if cfg.system is not None else []) + \
        [Message("user", user_content(cfg.prompt, 1))]


class _Worker:
    def __init__(self, cfg: WorkerConfig, pair: ModelPair):
        from llava_local.runtime.batch_decode import BatchDecoder
        from llava_local.runtime.context_fit import check_fit
        from llava_local.runtime.engine import Engine
        from llava_local.runtime.grammar import JsonOutput

        self.cfg = cfg
        self.output = JsonOutput(cfg.json_schema) if cfg.json_schema is not None else None
        max_image = pair.max_image_tokens(cfg.engine.image_max_tiles)
        n_ctx = cfg.engine.n_ctx or _context_size(cfg, max_image)
        self.engine = Engine(pair, cfg.engine, n_ctx=n_ctx, n_seq_max=cfg.parallel, workload="batch")
        llm = self.engine.llm
        self.prefix, self.suffix = self.engine.prompt.parts(caption_messages(cfg), n_images=1)
        self.decoder = BatchDecoder(llm, self.prefix, n_seq=cfg.parallel, ignore_eos=cfg.ignore_eos)
        self.per_item = len(self.suffix) + cfg.max_tokens          # KV cells of an item besides its image
        self.min_image = pair.image_tokens                          # the smallest (1.6: the base image alone)
        check_fit(n_ctx=llm.n_ctx, images=[max_image], n_text=len(self.suffix), n_answer=cfg.max_tokens,
                  in_use=len(self.prefix), hint="raise --ctx or lower --max-tokens")
        self.effective_parallel = min(cfg.parallel, self.decoder.capacity // (max_image + self.per_item))
        if self.effective_parallel < cfg.parallel:
            log.warning("n_ctx %d holds %d sequences, not --parallel %d", llm.n_ctx, self.effective_parallel,
                        cfg.parallel)
        self.square_config = None if pair.anyres else self.engine.vision.preprocess_config   # 1.6: tiled
        self.pool = ThreadPoolExecutor(max(1, cfg.io_threads), thread_name_prefix="caption-io")
        self.meta: dict[str, tuple] = {}     # key -> (item, load_s, encode_s) while decoding
        pl = self.engine.placement
        self.info = {"vision_backend": self.engine.vision.name, "vision_device": pl.vision_device,
                     "llm_device": pl.llm_device, "gpu_layers": pl.gpu_layers, "parallel": self.effective_parallel,
                     "n_ctx": llm.n_ctx, "prefix_tokens": len(self.prefix), "pid": os.getpid()}

    def _load(self, item: CaptionItem):
        from llava_local.image.load import load_image
        from llava_local.image.preprocess import square_image
        t0 = time.perf_counter()
        if item.data is None:
            loaded = load_image(item.path)
        else:   # load.py names bytes "<bytes>": the record names the file they came from
            try:
                loaded = load_image(item.data)
            except LlavaLocalError as exc:
                raise type(exc)(str(exc).replace("<bytes>", item.path, 1)) from None
        # pad + resize here, in the pool: the backends' own square step then returns the image as it is
        image = loaded.image if self.square_config is None else square_image(loaded.image, self.square_config)
        return image, time.perf_counter() - t0

    def _error(self, item: CaptionItem, message: str, **extra) -> dict:
        return {"key": item.key, "path": item.path, "status": "error", "caption": None, "error": message, **extra}

    def serve(self, conn) -> None:
        pending: deque = deque()     # (item, future of (square image, load seconds)), in arrival order
        stopping = False
        while True:
            idle = not self.decoder.active and not pending
            if idle and stopping:
                return
            if idle or conn.poll(0):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    return           # the job is gone
                if msg[0] == "items":
                    for item in msg[1]:
                        pending.append((item, self.pool.submit(self._load, item)))
                elif msg[0] == "stop":
                    stopping = True
                continue
            for rec in self._admit(pending):
                conn.send(("record", rec))
            if self.decoder.active:
                for res in self.decoder.step():
                    conn.send(("record", self._record(res)))

    def _admit(self, pending: deque) -> list[dict]:
        """Start as many loaded images as there is room for; return records of those that failed."""
        from llava_local.runtime.batch_decode import SeqRequest
        out, batch = [], []
        cells = self.decoder.capacity - self.decoder.reserved     # KV cells left for new items
        while pending and len(batch) < self.decoder.n_free and cells >= self.min_image + self.per_item:
            # Wait for the next image even when the decoder could step without it: which images share
            # a batch then depends on the job alone, not on thread timing, and llama.cpp's results
            # depend (in the last bits, which the F16 KV cache can amplify) on the batch. The pool
            # decodes up to `parallel + io_threads` images ahead, so the wait is rarely felt.
            item, fut = pending[0]
            try:
                image, load_s = fut.result()
            except LlavaLocalError as exc:
                pending.popleft()
                out.append(self._error(item, str(exc)))
                continue
            except Exception as exc:  # a decoder bug in Pillow etc.: this image's failure, not the job's
                pending.popleft()
                out.append(self._error(item, f"{item.path}: cannot decode image ({type(exc).__name__}: {exc})"))
                continue
            n_image = self.engine.image_tokens([image])[0]
            if n_image + self.per_item > cells and (batch or self.decoder.active):
                break                    # waits for room, in order (the job alone decides the batches)
            pending.popleft()
            if n_image + self.per_item > cells:    # alone and too big: the engine's check makes it never
                out.append(self._error(item, f"{item.path}: image needs {n_image} tokens (+{self.per_item} "
                                             f"text and answer), n_ctx is {self.engine.llm.n_ctx}"))
                continue                           # happen, but a job must not wait for it for ever
            cells -= n_image + self.per_item
            batch.append((item, image, load_s))
        if not batch:
            return out
        sampling = self.cfg.sampling
        for (item, _, load_s), (emb, enc_s) in zip(batch, self._encode(batch)):
            if isinstance(emb, Exception):
                out.append(self._error(item, f"{item.path}: vision encoder failed ({emb})"))
                continue
            params = replace(sampling, seed=item_seed(sampling.seed, item.key))
            sampler = self.engine.sampler(params, self.output)     # a grammar per sequence, with a schema
            self.decoder.admit(SeqRequest(item.key, [emb, self.suffix], sampler, self.cfg.max_tokens))
            self.meta[item.key] = (item, load_s, enc_s)
        return out

    def _encode(self, batch: list[tuple]) -> list[tuple]:
        """(embedding, seconds) per (item, square image, load seconds) of `batch`, in one backend
        call; when that fails, one image at a time, and the refused image gets its exception."""
        t0 = time.perf_counter()
        try:
            embeds = list(self.engine.encode_images([im for _, im, _ in batch]))
            each = (time.perf_counter() - t0) / len(batch)
            return [(emb, each) for emb in embeds]
        except Exception:            # find which image the backend refuses: one at a time
            pass
        out = []
        for _, im, _ in batch:
            t1 = time.perf_counter()
            try:
                emb = self.engine.encode_images([im])[0]
            except Exception as exc:
                emb = exc
            out.append((emb, time.perf_counter() - t1))
        return out

    def _record(self, res) -> dict:
        item, load_s, enc_s = self.meta.pop(res.key)
        stats = {"n_tokens": len(res.tokens), "finish_reason": res.finish_reason,
                 "n_prompt_tokens": len(self.prefix) + res.n_prompt,
                 "timings": {"load_s": round(load_s, 4), "encode_s": round(enc_s, 4),
                             "generate_s": round(res.seconds, 4)}}
        parsed = {}
        if self.output is not None:
            try:
                parsed["json"] = self.output.parse(res.text, res.finish_reason)
            except StructuredOutputError as exc:
                return self._error(item, f"{item.path}: {exc}", **stats)
        return {"key": item.key, "path": item.path, "status": "ok", "caption": res.text, **parsed, "error": None,
                **stats}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()


def worker_main(conn, cfg: WorkerConfig, pair: ModelPair) -> None:
    """Entry point of the worker process; `pair` was resolved by the job (it pickles: plain data)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the job's to handle
    die_with_parent()
    setup_logging(cfg.engine.verbose)
    try:
        worker = _Worker(cfg, pair)
    except BaseException as exc:     # anything: the job must say why, not hang
        conn.send(("fatal", str(exc) if isinstance(exc, LlavaLocalError) else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", worker.info))
    cpu0 = time.process_time()
    try:
        worker.serve(conn)
    except BaseException as exc:     # a bug or a llama.cpp error mid-batch: die, let the supervisor isolate
        if cfg.engine.verbose:
            traceback.print_exc(file=sys.stderr)
        try:
            conn.send(("died", f"{type(exc).__name__}: {exc}"))
        except (OSError, ValueError):
            pass
        os._exit(3)
    try:   # CPU seconds spent captioning (model load excluded), for benchmarks
        conn.send(("stats", {"cpu_s": time.process_time() - cpu0, "decode_calls": worker.decoder.n_decode_calls}))
    except (OSError, ValueError):
        pass
    worker.close()
