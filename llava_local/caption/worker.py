"""The captioning engine in a worker process, and the supervisor that keeps a job alive around it.

llama.cpp answers some faults with `abort()`, a bad image can crash a decoder, the OOM killer picks
the biggest process: none of that may end a 100,000-image job. The engine therefore runs in a
process of its own (multiprocessing, spawn). `WorkerSupervisor.run(items)` feeds it (key, path)
items and yields one record per item:

    sup = WorkerSupervisor(WorkerConfig(llm_path=..., mmproj_path=..., prompt="...", parallel=8))
    for record in sup.run([CaptionItem("a.jpg", "imgs/a.jpg"), ...]):
        print(record["key"], record["status"], record.get("caption") or record["error"])

Inside the worker: images are decoded and squared (LLaVA's pad + resize) by a thread pool, encoded
by the vision backend in batches, and captioned by `BatchDecoder` (`parallel` sequences per
llama.cpp batch, the prompt prefix shared in the KV cache).

When the worker dies, the items in flight are suspects: each is then run alone in a fresh worker,
so the one that kills it again gets the error record ("worker process died (SIGABRT) ...") and the
innocent ones are captioned. A worker that produces nothing for `stall_timeout` seconds is killed
and judged the same way. A worker that dies while loading the model ends the job (that is no
image's fault), as do MAX_DEATHS_IN_A_ROW images in a row that each killed it alone.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from typing import Iterable, Iterator

from llava_local.errors import LlavaLocalError
from llava_local.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

# Test-only fault injection (tests/test_caption_faults.py): "KEY" makes the worker call os.abort()
# when it is about to encode that image, "KEY@SIGKILL" kill itself with that signal (an OOM kill).
# Not an option, never set in normal use.
TEST_CRASH_ENV = "_LLAVA_LOCAL_TEST_CRASH_ON_KEY"

MAX_DEATHS_IN_A_ROW = 10      # images in a row that killed the worker: then it is the model or machine
STALL_TIMEOUT_S = 1800.0      # no record for this long: the worker is hung (a 7B answer takes minutes on a laptop)


@dataclass(frozen=True)
class CaptionItem:
    key: str    # the record's identity (resume, shards)
    path: str   # where the image is read from


@dataclass(frozen=True)
class WorkerConfig:
    llm_path: str
    mmproj_path: str
    prompt: str
    system: str | None = None
    sampling: SamplingParams = SamplingParams()
    max_tokens: int = 128
    parallel: int = 4               # sequences decoded together (llama.cpp n_seq_max)
    io_threads: int = 2             # image decoding + squaring threads
    vision_backend: str = "auto"     # "auto" values are decided by resolve_worker before the job starts
    vision_device: str = "auto"
    n_ctx: int | None = None        # None: room for `parallel` full answers (see _context_size)
    gpu_layers: int | str = "auto"
    threads: int | None = None
    template: str | None = None
    verbose: bool = False
    ignore_eos: bool = False        # benchmarks: every caption runs to max_tokens (batch_decode.py)


class WorkerStartError(LlavaLocalError):
    """The worker process could not load the model."""


def item_seed(seed: int | None, key: str) -> int | None:
    """A per-image seed: a seeded job gives each image the same answer whatever it is batched with."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown status"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit status {exitcode}"


# --------------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the job process dies (even by SIGKILL), so none is orphaned."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except OSError:
            pass


def _context_size(cfg: WorkerConfig, image_tokens: int) -> int:
    """KV cells for `parallel` sequences: the prefix once, then image + question + answer each.
    Text is bounded by its UTF-8 bytes (a token is at least one byte); the decoder admits by the
    real token counts, so a too-small context lowers the parallelism instead of failing."""
    text = len((cfg.prompt + (cfg.system or "")).encode()) + 512   # + template text and default system prompt
    return text + cfg.parallel * (image_tokens + len(cfg.prompt.encode()) + 64 + cfg.max_tokens)


def resolve_worker(cfg: WorkerConfig) -> WorkerConfig:
    """The config with "auto" placement (GPU layers, vision backend and device) decided here, in
    the job's process, by placement.resolve_placement: records and their fingerprint then name what
    actually runs, and every restarted worker runs the same."""
    if "auto" not in (cfg.vision_backend, cfg.vision_device, cfg.gpu_layers) and cfg.gpu_layers != "all":
        return cfg
    from llava_local.runtime.model_pair import resolve_pair
    from llava_local.runtime.placement import resolve_placement
    pair = resolve_pair(cfg.llm_path, cfg.mmproj_path)
    p = resolve_placement(pair, gpu_layers=cfg.gpu_layers, vision_backend=cfg.vision_backend,
                          vision_device=cfg.vision_device, n_ctx=cfg.n_ctx or _context_size(cfg, pair.image_tokens),
                          workload="batch")
    log.info("caption worker: %s", p.describe())
    return replace(cfg, vision_backend=p.vision_backend, vision_device=p.vision_device, gpu_layers=p.gpu_layers)


class _Worker:
    def __init__(self, cfg: WorkerConfig):

        from llava_local.runtime import engine as engine_mod
        from llava_local.runtime.chat_session import user_content
        from llava_local.runtime.model_pair import resolve_pair
        from llava_local.prompts.templates import IMAGE_MARKER, Message
        from llava_local.runtime.batch_decode import BatchDecoder

        self.cfg = cfg
        pair = resolve_pair(cfg.llm_path, cfg.mmproj_path)
        n_ctx = cfg.n_ctx or _context_size(cfg, pair.image_tokens)
        self.engine = engine_mod.Engine(pair, vision_backend=cfg.vision_backend, n_ctx=n_ctx,
                                        n_gpu_layers=cfg.gpu_layers, vision_device=cfg.vision_device,
                                        threads=cfg.threads, template=cfg.template, verbose=cfg.verbose,
                                        n_seq_max=cfg.parallel)   # `parallel` sequences decoded together
        llm = self.engine.llm
        messages = ([Message("system", cfg.system)] if cfg.system is not None else []) + \
                   [Message("user", user_content(cfg.prompt, 1))]
        text = self.engine.format.render(messages, add_generation_prompt=True)
        if text.count(IMAGE_MARKER) != 1:
            raise LlavaLocalError(f"the chat template placed {text.count(IMAGE_MARKER)} images, expected 1")
        before, after = text.split(IMAGE_MARKER)
        self.prefix = llm.tokenize(before)
        self.suffix = llm.tokenize(after)
        self.decoder = BatchDecoder(llm, self.prefix, n_seq=cfg.parallel, ignore_eos=cfg.ignore_eos)
        self.per_item = pair.image_tokens + len(self.suffix) + cfg.max_tokens
        self.effective_parallel = min(cfg.parallel, self.decoder.capacity // self.per_item)
        if self.effective_parallel < 1:
            raise LlavaLocalError(f"an image needs {pair.image_tokens} tokens + {len(self.suffix)} text + "
                                  f"--max-tokens {cfg.max_tokens}, n_ctx is {llm.n_ctx} with a "
                                  f"{len(self.prefix)}-token prefix: raise --ctx or lower --max-tokens")
        if self.effective_parallel < cfg.parallel:
            log.warning("n_ctx %d holds %d sequences, not --parallel %d", llm.n_ctx, self.effective_parallel,
                        cfg.parallel)
        self.square_config = self.engine.vision.preprocess_config
        self.pool = ThreadPoolExecutor(max(1, cfg.io_threads), thread_name_prefix="caption-io")
        self.crash_key = os.environ.get(TEST_CRASH_ENV)
        self.meta: dict[str, tuple] = {}     # key -> (item, load_s, encode_s) while decoding
        pl = self.engine.placement
        self.info = {"vision_backend": self.engine.vision.name, "vision_device": pl.vision_device,
                     "llm_device": pl.llm_device, "gpu_layers": pl.gpu_layers, "parallel": self.effective_parallel,
                     "n_ctx": llm.n_ctx, "prefix_tokens": len(self.prefix), "pid": os.getpid()}

    def _load(self, item: CaptionItem):
        from llava_local.image.load import load_image
        from llava_local.image.preprocess import square_image
        t0 = time.perf_counter()
        loaded = load_image(item.path)
        # pad + resize here, in the pool: the backends' own square step is then a no-op copy
        return square_image(loaded.image, self.square_config), time.perf_counter() - t0

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
        from llava_local.runtime.sampling import Sampler
        out, batch = [], []
        room = min(self.decoder.n_free, (self.decoder.capacity - self.decoder.reserved) // self.per_item)
        while pending and len(batch) < room:
            # Wait for the next image even when the decoder could step without it: which images share
            # a batch then depends on the job alone, not on thread timing, and llama.cpp's results
            # depend (in the last bits, which the F16 KV cache can amplify) on the batch. The pool
            # decodes up to `parallel + io_threads` images ahead, so the wait is rarely felt.
            item, fut = pending.popleft()
            try:
                image, load_s = fut.result()
            except LlavaLocalError as exc:
                out.append(self._error(item, str(exc)))
                continue
            except Exception as exc:  # a decoder bug in Pillow etc.: this image's failure, not the job's
                out.append(self._error(item, f"{item.path}: cannot decode image ({type(exc).__name__}: {exc})"))
                continue
            batch.append((item, image, load_s))
        if not batch:
            return out
        if self.crash_key is not None:
            self._test_crash([item.key for item, _, _ in batch])
        t0 = time.perf_counter()
        try:
            embeds = list(self.engine.encode_images([im for _, im, _ in batch]))
            encode_s = [(time.perf_counter() - t0) / len(batch)] * len(batch)
        except Exception:            # find which image the backend refuses: one at a time
            embeds, encode_s = [], []
            for item, im, _ in batch:
                t1 = time.perf_counter()
                try:
                    embeds.append(self.engine.encode_images([im])[0])
                except Exception as exc:
                    embeds.append(exc)
                encode_s.append(time.perf_counter() - t1)
        sampling = self.cfg.sampling
        for (item, _, load_s), emb, enc_s in zip(batch, embeds, encode_s):
            if isinstance(emb, Exception):
                out.append(self._error(item, f"{item.path}: vision encoder failed ({emb})"))
                continue
            params = replace(sampling, seed=item_seed(sampling.seed, item.key))
            self.decoder.admit(SeqRequest(item.key, [emb, self.suffix], Sampler(params), self.cfg.max_tokens))
            self.meta[item.key] = (item, load_s, enc_s)
        return out

    def _test_crash(self, keys: list[str]) -> None:
        key, _, sig = self.crash_key.partition("@")
        if key in keys:
            if sig:
                os.kill(os.getpid(), signal.Signals[sig])
            os.abort()

    def _record(self, res) -> dict:
        item, load_s, enc_s = self.meta.pop(res.key)
        return {"key": item.key, "path": item.path, "status": "ok", "caption": res.text, "error": None,
                "n_tokens": len(res.tokens), "finish_reason": res.finish_reason,
                "n_prompt_tokens": len(self.prefix) + res.n_prompt,
                "timings": {"load_s": round(load_s, 4), "encode_s": round(enc_s, 4),
                            "generate_s": round(res.seconds, 4)}}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()


def worker_main(conn, cfg: WorkerConfig) -> None:
    """Entry point of the worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the job's to handle
    _die_with_parent()
    logging.basicConfig(level=logging.INFO if cfg.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        worker = _Worker(cfg)
    except BaseException as exc:     # anything: the job must say why, not hang
        conn.send(("fatal", str(exc) if isinstance(exc, LlavaLocalError) else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", worker.info))
    cpu0 = time.process_time()
    try:
        worker.serve(conn)
    except BaseException as exc:     # a bug or a llama.cpp error mid-batch: die, let the supervisor isolate
        if cfg.verbose:
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


# --------------------------------------------------------------------------------------------------
# The supervisor (in the job process)
# --------------------------------------------------------------------------------------------------

@dataclass
class SupervisorStats:
    restarts: int = 0
    load_s: float = 0.0              # summed model load time of every worker started
    worker_cpu_s: float = 0.0        # CPU time of workers that stopped cleanly, model load excluded
    info: dict = field(default_factory=dict)


class WorkerSupervisor:
    def __init__(self, cfg: WorkerConfig, *, on_ready=None, stall_timeout: float | None = STALL_TIMEOUT_S):
        self.cfg = cfg
        self.on_ready = on_ready
        self.stall_timeout = stall_timeout
        self.stats = SupervisorStats()
        self._mp = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None

    # --- process management ---
    def _start(self) -> None:
        parent, child = self._mp.Pipe()
        t0 = time.perf_counter()
        proc = self._mp.Process(target=worker_main, args=(child, self.cfg), name="llava-local-caption-worker",
                                daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        try:
            while True:
                if parent.poll(0.2):
                    msg = parent.recv()
                    break
                if not proc.is_alive() and not parent.poll(0):
                    raise EOFError
        except (EOFError, OSError):
            proc.join(5)
            self._stop()
            raise WorkerStartError(f"the caption worker died while loading the model "
                                   f"({_signal_name(proc.exitcode)}; run with --verbose for its log)") from None
        if msg[0] == "fatal":
            self._stop()
            raise WorkerStartError(msg[1])
        self.stats.load_s += time.perf_counter() - t0
        self.stats.info = msg[1]
        if self.on_ready:
            self.on_ready(msg[1])

    def _stop(self, graceful: bool = False) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is None:
            return
        if graceful and proc.is_alive():
            try:
                conn.send(("stop",))
                if conn.poll(10):
                    msg = conn.recv()
                    if msg[0] == "stats":
                        self.stats.worker_cpu_s += msg[1]["cpu_s"]
                proc.join(10)
            except (OSError, ValueError, EOFError):
                pass
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._stop(graceful=True)

    # --- the job ---
    def run(self, items: Iterable[CaptionItem], *, max_inflight: int | None = None) -> Iterator[dict]:
        """Yield one record per item (in completion order). Items that kill the worker get an error
        record; the worker is restarted. Raises WorkerStartError if the model cannot be loaded."""
        pending = deque(items)
        suspects: deque = deque()              # in flight when a worker died: now run one at a time
        inflight: dict[str, tuple[CaptionItem, bool]] = {}   # key -> (item, sent alone?)
        cap = max_inflight or (2 * self.cfg.parallel + self.cfg.io_threads)
        deaths_in_a_row = 0                    # images that killed the worker alone, with no success between
        try:
            while pending or suspects or inflight:
                if self._proc is None:
                    self._start()
                if suspects:
                    if not inflight:
                        item = suspects.popleft()
                        self._conn.send(("items", [item]))
                        inflight[item.key] = (item, True)
                else:
                    batch = []
                    while pending and len(inflight) + len(batch) < cap:
                        batch.append(pending.popleft())
                    if batch:
                        self._conn.send(("items", batch))
                        inflight.update((it.key, (it, False)) for it in batch)
                died_msg = None
                ready = wait([self._conn, self._proc.sentinel], timeout=self.stall_timeout)
                if not ready:
                    died_msg = f"no result for {self.stall_timeout:g} s, killed"
                    self._proc.kill()
                elif self._conn in ready:
                    try:
                        msg = self._conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None and msg[0] == "record":
                        rec = msg[1]
                        if rec["key"] in inflight:
                            del inflight[rec["key"]]
                            deaths_in_a_row = 0 if rec["status"] == "ok" else deaths_in_a_row
                            yield rec
                        continue
                    if msg is not None and msg[0] == "died":
                        died_msg = msg[1]
                    elif msg is not None:
                        continue             # nothing else is expected mid-job
                # the worker is dead (or dying): collect what it finished, then judge the rest
                self._proc.join(10)
                exitcode = self._proc.exitcode
                while True:
                    try:
                        if not self._conn.poll(0):
                            break
                        msg = self._conn.recv()
                    except (EOFError, OSError):
                        break
                    if msg[0] == "record" and msg[1]["key"] in inflight:
                        del inflight[msg[1]["key"]]
                        yield msg[1]
                    elif msg[0] == "died":
                        died_msg = msg[1]
                self._stop()
                self.stats.restarts += 1
                reason = f"worker process died ({_signal_name(exitcode)}" + (f": {died_msg})" if died_msg else ")")
                log.warning("%s with %d image(s) in flight; restarting it", reason, len(inflight))
                if len(inflight) == 1:         # alone in the worker: this image did it
                    (item, _), = inflight.values()
                    inflight.clear()
                    deaths_in_a_row += 1
                    yield {"key": item.key, "path": item.path, "status": "error", "caption": None,
                           "error": f"{item.path}: {reason} while captioning this image; the job restarted it"}
                    if deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
                        raise LlavaLocalError(f"{deaths_in_a_row} images in a row killed the caption worker "
                                              f"(last: {reason}): this looks like the model or the machine, "
                                              "not the images; run with --verbose")
                    continue
                suspects.extend(it for it, _ in inflight.values())
                inflight.clear()
        finally:
            self._stop(graceful=not (pending or suspects or inflight))
