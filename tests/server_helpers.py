"""A real `llava-local serve` for tests: the demo model in its engine process, uvicorn in a thread."""
from __future__ import annotations

import base64
import contextlib
from pathlib import Path

from llava_local.runtime.model_source import find_model
from llava_local.runtime.options import EngineOptions
from llava_local.server.launch import ServeOptions, Server

SAMPLES = Path(__file__).resolve().parents[1] / "llava_local" / "data" / "samples"


@contextlib.contextmanager
def running_server(pair=None, *, engine: EngineOptions | None = None, wait: bool = True, **opts):
    """Yield a started Server (its .url) on a free port; closed afterwards."""
    pair = pair if pair is not None else find_model(None)
    srv = Server(pair, engine or EngineOptions(threads=2), ServeOptions(port=0, **opts))
    srv.start_in_thread()
    try:
        if wait:
            srv.wait_ready()
        yield srv
    finally:
        srv.close()


def data_url(path: Path | str) -> str:
    data = Path(path).read_bytes()
    kind = "png" if data[:4] == b"\x89PNG" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def image_message(text: str, *images: str) -> dict:
    """A user message: the text, then each image as an image_url part (data: URLs or others)."""
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": u}} for u in images]}
