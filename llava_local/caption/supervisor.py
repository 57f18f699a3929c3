"""The supervisor that keeps a caption job alive around its worker process (worker.py).

`WorkerSupervisor.run(items)` starts the worker (multiprocessing, spawn), feeds it (key, path)
items and yields one record per item, restarting the worker whenever it dies:

    sup = WorkerSupervisor(WorkerConfig(llm_path=..., mmproj_path=..., prompt="...", parallel=8))
    for record in sup.run([CaptionItem("a.jpg", "imgs/a.jpg"), ...]):
        print(record["key"], record["status"], record.get("caption") or record["error"])
    print(sup.stats.restarts, sup.stats.load_s)

A long-lived host (a Ray actor, ray_job.py) calls `start()` once to load the model, then
`run(items, keep_alive=True)` per block: the worker stays loaded between blocks until `close()`.

When the worker dies, the items in flight are suspects: each is then run alone in a fresh worker,
so the one that kills it again gets the error record ("worker process died (SIGABRT) ...") and the
innocent ones are captioned. A worker that produces nothing for `stall_timeout` seconds is killed
and judged the same way. A worker that dies while loading the model ends the job (that is no
image's fault), as do MAX_DEATHS_IN_A_ROW images in a row that each killed it alone.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Iterable, Iterator

from llava_local.caption.worker import CaptionItem, WorkerConfig, worker_main
from llava_local.errors import LlavaLocalError
from llava_local.procs import signal_name, spawn

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

log = logging.getLogger(__name__)

MAX_DEATHS_IN_A_ROW = 10      # images in a row that killed the worker: then it is the model or machine
STALL_TIMEOUT_S = 1800.0      # no record for this long: the worker is hung (a 7B answer takes minutes on a laptop)


class WorkerStartError(LlavaLocalError):
    """The worker process could not load the model."""


@dataclass
class SupervisorStats:
    restarts: int = 0
    load_s: float = 0.0              # summed model load time of every worker started
    worker_cpu_s: float = 0.0        # CPU time of workers that stopped cleanly, model load excluded
    info: dict = field(default_factory=dict)


class WorkerSupervisor:
    """`pair`: the config's model files, resolved once (here when not given) and handed to every
    worker started, so a restart does not read the GGUF headers again."""

    def __init__(self, cfg: WorkerConfig, pair: ModelPair | None = None, *, on_ready=None,
                 stall_timeout: float | None = STALL_TIMEOUT_S):
        if pair is None:
            from llava_local.runtime.model_pair import resolve_pair
            pair = resolve_pair(cfg.llm_path, cfg.mmproj_path)
        self.cfg = cfg
        self.pair = pair
        self.on_ready = on_ready
        self.stall_timeout = stall_timeout
        self.stats = SupervisorStats()
        self._proc = None
        self._conn = None

    # --- process management ---
    def start(self) -> None:
        """Load the model now (else the first `run` does): a WorkerStartError surfaces here."""
        if self._proc is None:
            self._start()

    def _start(self) -> None:
        t0 = time.perf_counter()
        proc, parent = spawn(worker_main, (self.cfg, self.pair), "llava-local-caption-worker")
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
                                   f"({signal_name(proc.exitcode)}; run with --verbose for its log)") from None
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
    def run(self, items: Iterable[CaptionItem], *, max_inflight: int | None = None,
            keep_alive: bool = False) -> Iterator[dict]:
        """Yield one record per item (in completion order). Items that kill the worker get an error
        record; the worker is restarted. Raises WorkerStartError if the model cannot be loaded.
        `keep_alive`: a worker that finished every item stays loaded for the next `run`."""
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
                reason = f"worker process died ({signal_name(exitcode)}" + (f": {died_msg})" if died_msg else ")")
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
            finished = not (pending or suspects or inflight)
            if not (keep_alive and finished):
                self._stop(graceful=finished)
