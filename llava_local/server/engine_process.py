"""The HTTP server's side of the engine process (worker.py): start it, hand it requests, route what it
sends back to each request's asyncio queue, and restart it when it dies.

    proc = EngineProcess(ServeConfig(...), pair)
    proc.start()                                 # loads in the background; proc.state: loading -> ready
    handle = proc.submit()                       # in the event loop
    await asyncio.to_thread(proc.send, handle, ChatRequest(...))
    while True:
        kind, *payload = await handle.events.get()   # ("delta", text) ... ("done", result) | ("error", status, msg)

When the process dies (an abort() or a segfault in llama.cpp, the OOM killer), every request in
flight gets ("error", 500, ...) and a new process loads; requests meanwhile see state "loading".
A process that cannot load the model is fatal (state "failed", with the reason).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llava_local.procs import signal_name, spawn
from llava_local.server.worker import ChatRequest, ServeConfig, serve_worker_main

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

log = logging.getLogger(__name__)


@dataclass
class Handle:
    rid: str
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class EngineProcess:
    def __init__(self, cfg: ServeConfig, pair: ModelPair, *, on_event=None):
        """`on_event(kind, payload)`: called in the reader thread for "ready", "restart" and "died" (metrics)."""
        self.cfg, self.pair = cfg, pair
        self.state = "stopped"          # loading | ready | failed | stopped
        self.error = ""                 # why it failed
        self.info: dict = {}
        self.restarts = 0
        self._on_event = on_event or (lambda kind, payload: None)
        self._proc = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._handles: dict[str, Handle] = {}
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- life ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-reader", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state == "ready"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> bool:
        self._ready.clear()
        self.state = "loading"
        proc, parent = spawn(serve_worker_main, (self.cfg, self.pair), "llava-local-engine")
        self._proc, self._conn = proc, parent
        try:
            msg = parent.recv()
        except (EOFError, OSError):
            proc.join(5)
            msg = ("fatal", f"the engine process died while loading ({signal_name(proc.exitcode)})")
        if msg[0] != "ready":
            self.state, self.error = "failed", msg[1]
            log.error("engine failed to load: %s", msg[1])
            self._ready.set()
            self._on_event("failed", msg[1])
            return False
        self.info = msg[1]
        self.state = "ready"
        self._ready.set()
        self._on_event("ready", self.info)
        log.info("engine ready (pid %s): %s", proc.pid, self.info)
        return True

    def _run(self) -> None:
        while not self._closing:
            if not self._spawn():
                return
            self._read()
            if self._closing:
                return
            self._proc.join(5)
            why = signal_name(self._proc.exitcode)
            log.error("the engine process died (%s); failing %d requests in flight and restarting",
                      why, len(self._handles))
            self._fail_all(f"the engine process died ({why}) while answering; it is restarting")
            self.restarts += 1
            self._on_event("restart", why)

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            kind, rid = msg[0], msg[1]
            h = self._handles.get(rid)
            if h is None:
                continue
            if kind in ("done", "error"):
                self._handles.pop(rid, None)
            h.loop.call_soon_threadsafe(h.events.put_nowait, (kind, *msg[2:]))

    def _fail_all(self, message: str) -> None:
        handles, self._handles = self._handles, {}
        for h in handles.values():
            h.loop.call_soon_threadsafe(h.events.put_nowait, ("error", 500, message))

    # --- requests ---
    @property
    def in_flight(self) -> int:
        return len(self._handles)

    def submit(self) -> Handle:
        """Register a request; `send` hands it to the process (call it off the event loop: it may block)."""
        rid = f"req-{next(self._ids)}"
        h = Handle(rid, asyncio.Queue(), asyncio.get_running_loop())
        self._handles[rid] = h
        return h

    def send(self, h: Handle, req: ChatRequest) -> None:
        self._send(("req", h.rid, req), h)

    def cancel(self, h: Handle) -> None:
        """The client went away: free its sequence (no reply comes)."""
        if self._handles.pop(h.rid, None) is not None:
            self._send(("cancel", h.rid), None)

    def _send(self, msg, h: Handle | None) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError, AttributeError) as exc:   # dying: the reader fails it, or we do now
            if h is not None and self._handles.pop(h.rid, None) is not None:
                h.loop.call_soon_threadsafe(h.events.put_nowait, ("error", 500, f"the engine process is gone ({exc})"))

    def close(self) -> None:
        self._closing = True
        if self._conn is not None:
            try:
                with self._send_lock:
                    self._conn.send(("stop",))
            except (OSError, ValueError):
                pass
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self.state = "stopped"
