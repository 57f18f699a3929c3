"""A server in one object: the settings from the options, the engine process, the app, uvicorn.

    server = Server(pair, EngineOptions(gpu_layers="auto"), ServeOptions(port=8080, parallel=4))
    server.run()                         # blocks; Ctrl-C stops it (the CLI: `llava-local serve`)

    url = server.start_in_thread()       # tests and benches: "http://127.0.0.1:PORT", model loading
    server.wait_ready(); ...; server.close()
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llava_local.errors import LlavaLocalError
from llava_local.runtime.options import EngineOptions
from llava_local.server.app import ServerSettings, create_app
from llava_local.server.engine_process import EngineProcess
from llava_local.server.guard import GuardConfig
from llava_local.server.media import MediaPolicy
from llava_local.server.metrics import Metrics
from llava_local.server.protocol import Limits
from llava_local.server.worker import ServeConfig

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"                     # loopback: only this machine can connect
    port: int = 8080                            # 0: any free port (tests)
    api_key: str | None = None                  # required when `host` is not loopback
    parallel: int = 4                           # conversations decoded together in one llama.cpp batch
    max_queue: int = 64                         # requests waiting beyond those; more get 503 + Retry-After
    cors_origins: tuple[str, ...] = ()          # browser origins allowed besides the server's own page
    allow_image_hosts: tuple[str, ...] = ()     # http(s) image_url hosts; none by default (data: URIs only)
    allow_private_image_hosts: bool = False     # those hosts may resolve to loopback/private addresses
    media_dir: str | None = None                # file:// image_urls only under this directory
    max_body_mb: float = 32.0                   # request body
    max_image_mb: float = 10.0                  # one image (data: payload, download or file)
    max_images: int = 8                         # per request
    max_tokens: int = 512                       # an answer's default length when the request sets none
    max_prompt_tokens: int | None = None        # None: the context size
    model_alias: str | None = None              # the model id (default: the manifest's name or the LLM's file name)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_id(pair: ModelPair, alias: str | None) -> str:
    if alias:
        return alias
    return (pair.manifest or {}).get("name") or Path(pair.llm_path).stem


class Server:
    def __init__(self, pair: ModelPair, engine: EngineOptions, opts: ServeOptions = ServeOptions(), *,
                 on_status=None):
        """`on_status(message)`: told when the model is loaded (the CLI prints it)."""
        if not is_loopback(opts.host) and not opts.api_key:
            raise LlavaLocalError(f"--host {opts.host} lets other machines connect: set --api-key (or "
                                  "LLAVA_LOCAL_API_KEY), or bind 127.0.0.1")
        if opts.parallel < 1 or opts.max_queue < 0 or opts.max_images < 0 or opts.max_tokens < 1:
            raise LlavaLocalError("--parallel and --max-tokens must be >= 1, --max-queue and --max-images >= 0")
        media_dir = Path(opts.media_dir).resolve() if opts.media_dir else None
        if media_dir is not None and not media_dir.is_dir():
            raise LlavaLocalError(f"--media-dir {opts.media_dir}: not a directory")
        from llava_local.runtime.model_pair import default_context
        n_ctx = engine.n_ctx or default_context(pair, engine.image_max_tiles)
        self.opts = opts
        self.engine_options = dataclasses.replace(engine, n_ctx=n_ctx, n_seq_max=opts.parallel, workload="session")
        cfg = ServeConfig(self.engine_options, max_prompt_tokens=min(opts.max_prompt_tokens or n_ctx, n_ctx))
        self.metrics = Metrics()
        self.engine = EngineProcess(cfg, pair, on_event=self._on_engine_event)
        self.settings = ServerSettings(
            model_id=model_id(pair, opts.model_alias), parallel=opts.parallel, max_queue=opts.max_queue,
            limits=Limits(max_tokens=n_ctx, default_max_tokens=min(opts.max_tokens, n_ctx), max_images=opts.max_images),
            media=MediaPolicy(allow_hosts=frozenset(h.lower() for h in opts.allow_image_hosts),
                              allow_private=opts.allow_private_image_hosts, media_dir=media_dir,
                              max_bytes=int(opts.max_image_mb * (1 << 20))),
            guard=GuardConfig(check_host=is_loopback(opts.host), cors_origins=frozenset(opts.cors_origins),
                              api_key=opts.api_key, max_body=int(opts.max_body_mb * (1 << 20))))
        self.app = create_app(self.settings, self.engine, self.metrics)
        self._uvicorn = None
        self._thread: threading.Thread | None = None
        self.port = opts.port
        self._on_status = on_status or (lambda message: None)

    def _on_engine_event(self, kind: str, payload) -> None:
        if kind == "ready":
            self._on_status(f"ready on {self.url}: LLM on {payload['llm_device']}, vision {payload['vision_backend']} "
                            f"on {payload['vision_device']}, {payload['parallel']} parallel sequences, "
                            f"n_ctx {payload['n_ctx']} shared")
        elif kind == "restart":
            self.metrics.restarts.inc()
        elif kind == "failed" and self._uvicorn is not None:
            log.error("the model could not be loaded: %s", payload)
            self._uvicorn.should_exit = True

    def _config(self):
        import uvicorn
        return uvicorn.Config(self.app, host=self.opts.host, port=self.port, log_level="warning",
                              server_header=False, timeout_graceful_shutdown=5, access_log=False)

    def _listen(self) -> socket.socket:
        """The listening socket, bound before the model loads: a taken port is a clear error at once."""
        family = socket.AF_INET6 if ":" in self.opts.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.opts.host, self.port))
        except OSError as exc:
            sock.close()
            raise LlavaLocalError(f"cannot listen on {self.opts.host}:{self.port}: {exc.strerror or exc} "
                                  "(another server there? choose --port)") from None
        self.port = sock.getsockname()[1]
        return sock

    def run(self) -> None:
        """Load the model in the background and serve until Ctrl-C (or until the model fails to load)."""
        import uvicorn
        sock = self._listen()
        self._uvicorn = uvicorn.Server(self._config())
        self.engine.start()
        self._on_status(f"serving {self.settings.model_id} on {self.url}; the model is loading (/health says when "
                        f"it is ready); " + ("API key required" if self.opts.api_key else "no API key"))
        try:
            self._uvicorn.run(sockets=[sock])
        finally:
            self.engine.close()
            sock.close()
        if self.engine.state == "failed":
            raise LlavaLocalError(f"the model could not be loaded: {self.engine.error}")

    def start_in_thread(self) -> str:
        """Serve from a thread (tests, benches); the base URL. The model loads in the background."""
        import uvicorn
        sock = self._listen()
        self._uvicorn = uvicorn.Server(self._config())
        self.engine.start()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="uvicorn",
                                        daemon=True)
        self._thread.start()
        while not self._uvicorn.started and self._thread.is_alive():
            threading.Event().wait(0.02)
        return self.url

    @property
    def url(self) -> str:
        host = f"[{self.opts.host}]" if ":" in self.opts.host else self.opts.host
        return f"http://{host}:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        if not self.engine.wait_ready(timeout):
            raise LlavaLocalError(f"the model did not load: {self.engine.error or self.engine.state}")

    def close(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.engine.close()
