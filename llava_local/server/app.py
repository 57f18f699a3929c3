"""The OpenAI-compatible HTTP API (FastAPI) over the engine process.

    POST /v1/chat/completions   text + image_url parts, stream (SSE), response_format, usage
    GET  /v1/models             the one model served
    GET  /health                200 when the model is loaded, 503 while it loads
    GET  /metrics               Prometheus (metrics.py)
    GET  /                      a one-file chat page (static/chat.html)

    app = create_app(settings, EngineProcess(cfg, pair), Metrics())
    uvicorn.run(app, host="127.0.0.1", port=8080)

Errors are OpenAI's JSON ({"error": {"message", "type", "param", "code"}}) with the status that says
whose fault it is: 400 a bad request or image, 401 the key, 403 host/origin, 404 the model, 413 too
large, 422 a value out of bounds, 500 the engine died (it restarts), 503 loading or the queue is full.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from llava_local.errors import LlavaLocalError
from llava_local.server.engine_process import EngineProcess, Handle
from llava_local.server.guard import BodyTooLarge, Guard, GuardConfig, error_body
from llava_local.server.media import MediaPolicy
from llava_local.server.metrics import Metrics
from llava_local.server.protocol import ChatCompletionRequest, Limits, RequestError, build_chat_request

log = logging.getLogger(__name__)

RETRY_AFTER_S = "2"


@dataclass(frozen=True)
class ServerSettings:
    model_id: str                # what /v1/models lists and requests must name (or omit)
    parallel: int                # sequences decoded together
    max_queue: int               # requests waiting beyond those; more: 503
    limits: Limits
    media: MediaPolicy
    guard: GuardConfig


def _error(status: int, message: str, code: str | None = None, param: str | None = None,
           headers: dict | None = None) -> Response:
    return Response(error_body(status, message, code, param), status, headers=headers, media_type="application/json")


def _validation_message(exc: ValidationError) -> tuple[str, str]:
    e = exc.errors()[0]
    where = ".".join(str(x) for x in e["loc"])
    return f"{where}: {e['msg']}", where


def create_app(settings: ServerSettings, engine: EngineProcess, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="llava-local", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("llava_local.server").joinpath("static/chat.html").read_text(encoding="utf-8")

    def answered(status: int) -> None:
        metrics.requests.labels(str(status)).inc()
        metrics.load(engine.in_flight, settings.parallel)

    def fail(status: int, message: str, code: str | None = None, param: str | None = None) -> Response:
        answered(status)
        headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
        return _error(status, message, code, param, headers)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if engine.state == "ready":
            return {"status": "ok", "model": settings.model_id}
        body = {"status": engine.state, "error": engine.error} if engine.error else {"status": engine.state}
        return JSONResponse(body, 503, headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model", "created": 0,
                                            "owned_by": "llava-local", "meta": engine.info}]}

    @app.get("/metrics")
    async def prometheus():
        metrics.load(engine.in_flight, settings.parallel)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        try:
            body = await request.body()
        except BodyTooLarge:
            return fail(413, f"request body is over this server's limit of {settings.guard.max_body} bytes",
                        "request_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return fail(400, f"the body is not valid JSON ({exc})", "invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            return fail(422, message, "invalid_value", param)
        if req.model not in (None, "", settings.model_id):
            return fail(404, f"model {req.model!r} is not served here (this server has {settings.model_id!r})",
                        "model_not_found", "model")
        if engine.state != "ready":
            return fail(503, f"the model is {engine.state}" + (f": {engine.error}" if engine.error else ""),
                        "model_loading")
        if engine.in_flight >= settings.parallel + settings.max_queue:
            return fail(503, f"the server is busy ({engine.in_flight} requests in flight); retry shortly",
                        "overloaded")
        try:
            chat = await asyncio.to_thread(build_chat_request, req, settings.limits, settings.media)
        except RequestError as exc:
            return fail(exc.status, str(exc), exc.code, exc.param)
        except LlavaLocalError as exc:
            return fail(400, str(exc))
        h = engine.submit()
        metrics.load(engine.in_flight, settings.parallel)
        await asyncio.to_thread(engine.send, h, chat)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            first = await _next_event(request, engine, h)
            if first is None:
                return fail(499, "client closed the request")
            if first[0] == "error":
                return fail(first[1], first[2])
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(engine, h, first, ident, settings.model_id, include_usage, t0, metrics,
                                          answered), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        event = await _wait_done(request, engine, h)
        if event is None:
            return fail(499, "client closed the request")
        if event[0] == "error":
            return fail(event[1], event[2])
        result = event[1]
        metrics.answered(result, max(0.0, time.perf_counter() - t0 - result["decode_s"]))
        answered(200)
        return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": settings.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "logprobs": None, "finish_reason": _finish(result)}],
                "usage": _usage(result)}

    app.add_middleware(CORSMiddleware, allow_origins=sorted(settings.guard.cors_origins),
                       allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type", "X-Api-Key"])
    app.add_middleware(Guard, cfg=settings.guard)
    return app


def _finish(result: dict) -> str:
    return "length" if result["finish_reason"] == "length" else "stop"


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]}}


async def _next_event(request: Request, engine: EngineProcess, h: Handle):
    """The request's next event from the engine, or None when the client went away (its sequence is freed)."""
    while True:
        try:
            return await asyncio.wait_for(h.events.get(), 0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                await asyncio.to_thread(engine.cancel, h)
                return None


async def _wait_done(request: Request, engine: EngineProcess, h: Handle):
    while True:
        event = await _next_event(request, engine, h)
        if event is None or event[0] in ("done", "error"):
            return event


def _chunk(ident: str, model: str, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    body = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None,
                                                       "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(engine: EngineProcess, h: Handle, first, ident: str, model: str, include_usage: bool, t0: float,
               metrics: Metrics, answered):
    """Server-sent events: the role, the text as it grows, the finish reason, [usage], [DONE]. A client
    that goes away cancels this generator: its sequence is freed and the others go on."""
    finished = False
    t_first = None
    try:
        yield _chunk(ident, model, {"role": "assistant", "content": ""})
        event = first
        while True:
            if event[0] == "delta":
                t_first = t_first or time.perf_counter()
                yield _chunk(ident, model, {"content": event[1]})
            elif event[0] == "done":
                result = event[1]
                finished = True
                metrics.answered(result, (t_first or time.perf_counter()) - t0)
                answered(200)
                yield _chunk(ident, model, {}, _finish(result))
                if include_usage:
                    yield _chunk(ident, model, {}, usage=_usage(result))
                yield "data: [DONE]\n\n"
                return
            else:                                   # ("error", status, message) after the stream began
                finished = True
                answered(event[1])
                yield f"data: {error_body(event[1], event[2]).decode()}\n\n"
                yield "data: [DONE]\n\n"
                return
            event = await h.events.get()
    finally:
        if not finished:
            engine.cancel(h)
            answered(499)
