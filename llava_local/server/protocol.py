"""OpenAI's chat-completions request, bounded, and its conversion into the engine's ChatRequest.

Every field a client may send has a type and bounds (a negative or huge number is a 422, never a
decode); fields we do not implement and that would change the answer (tools, logprobs, n > 1) are
refused rather than ignored. Images come from `image_url` parts through media.py's policy (data:
URIs by default) and are decoded and checked here, in the server process, so a bad image is a 400
naming its part and never reaches the engine.

    req = ChatCompletionRequest.model_validate(json_body)
    chat = build_chat_request(req, limits, policy)      # fetches and decodes images: call it in a thread
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llava_local.errors import LlavaLocalError
from llava_local.image.load import load_image
from llava_local.prompts.templates import IMAGE_MARKER
from llava_local.prompts.turns import user_content
from llava_local.runtime.grammar import JsonOutput
from llava_local.runtime.sampling import SamplingParams
from llava_local.server.media import MediaError, MediaPolicy, image_bytes
from llava_local.server.worker import ChatRequest

MAX_TOKENS_BOUND = 1 << 20          # a bound for validation; the server's own cap is Limits.max_tokens


class RequestError(LlavaLocalError):
    """A request the server refuses: `status` is the HTTP status, `param` the field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str = Field(max_length=64 << 20)
    detail: str | None = None


class ContentPart(_Model):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class JsonSchemaFormat(_Model):
    name: str = "response"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND)
    temperature: float = Field(1.0, ge=0, le=2)           # OpenAI's defaults: a client that sets none gets them
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1000)                   # llama.cpp's extension; 0 = off
    repeat_penalty: float = Field(1.0, gt=0, le=10)        # llama.cpp's extension; 1 = off
    frequency_penalty: float = Field(0.0, ge=-2, le=2)     # accepted for compatibility; only 0 is implemented
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)                          # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    tools: list | None = None


@dataclass(frozen=True)
class Limits:
    max_tokens: int             # an answer, at most (the context size)
    default_max_tokens: int     # when the client sets none
    max_images: int = 8         # per request, checked before any image is fetched or decoded
    max_stop: int = 4           # stop strings (OpenAI's limit), each at most 256 characters


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise RequestError("tools are not supported by this server", param="tools")
    if req.logprobs:
        raise RequestError("logprobs are not supported by this server", param="logprobs")
    if req.frequency_penalty or req.presence_penalty:
        raise RequestError("frequency_penalty and presence_penalty are not supported (use repeat_penalty)",
                           param="frequency_penalty" if req.frequency_penalty else "presence_penalty")


def _stops(req: ChatCompletionRequest, limits: Limits) -> tuple[str, ...]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stop or any(len(s) > 256 for s in stops):
        raise RequestError(f"at most {limits.max_stop} stop strings of up to 256 characters", 422, "stop")
    return tuple(s for s in stops if s)


def _message_parts(req: ChatCompletionRequest, limits: Limits) -> list[tuple[str, list[str], list[tuple[str, str]]]]:
    """(role, texts, [(part name, url)]) per message; the image count is checked before any fetch."""
    out, n_images = [], 0
    for i, m in enumerate(req.messages):
        texts, urls = [], []
        parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        for j, p in enumerate(parts):
            name = f"messages[{i}].content[{j}]" if not isinstance(m.content, str) else f"messages[{i}].content"
            if p.type == "text":
                if p.text is None:
                    raise RequestError(f"{name}: a text part needs \"text\"", param=name)
                if IMAGE_MARKER in p.text:
                    raise RequestError(f"{name}: the text may not contain {IMAGE_MARKER!r}: send images as "
                                       "image_url parts", param=name)
                texts.append(p.text)
            else:
                url = p.image_url.url if isinstance(p.image_url, ImageURL) else p.image_url
                if not url:
                    raise RequestError(f"{name}: an image_url part needs a url", param=name)
                if m.role != "user":
                    raise RequestError(f"{name}: images are only allowed in user messages", param=name)
                urls.append((name, url))
        n_images += len(urls)
        out.append(("system" if m.role == "developer" else m.role, texts, urls))
    if n_images > limits.max_images:
        raise RequestError(f"{n_images} images in one request; this server takes at most {limits.max_images} "
                           "(--max-images)", param="messages")
    return out


def build_chat_request(req: ChatCompletionRequest, limits: Limits, policy: MediaPolicy) -> ChatRequest:
    """The engine's request: messages with IMAGE_MARKERs (a message's images go before its text, as
    LLaVA was trained and as `llava-local chat` does), decoded images, sampling and limits."""
    _refuse_unsupported(req)
    max_tokens = req.max_completion_tokens or req.max_tokens or min(limits.default_max_tokens, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise RequestError(f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                           422, "max_tokens")
    stops = _stops(req, limits)
    fmt = req.response_format or ResponseFormat()
    if fmt.type == "json_schema":
        if fmt.json_schema is None or not fmt.json_schema.schema_:
            raise RequestError("response_format json_schema needs json_schema.schema", param="response_format")
        try:
            JsonOutput(fmt.json_schema.schema_)       # a bad or unsupported schema: refused before any work
        except LlavaLocalError as exc:
            raise RequestError(f"response_format: {exc}", param="response_format") from None
    messages, images = [], []
    for role, texts, urls in _message_parts(req, limits):
        for name, url in urls:
            try:
                images.append(load_image(image_bytes(url, policy)))
            except MediaError as exc:
                raise RequestError(f"{name}: {exc}", exc.status, name) from None
            except LlavaLocalError as exc:          # ImageError: not an image, truncated, too many pixels
                raise RequestError(f"{name}: {exc}", 400, name) from None
        text = "\n\n".join(texts)
        messages.append((role, user_content(text, len(urls)) if urls else text))
    seed = None if req.seed is None else req.seed % (1 << 64)
    sampling = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                              repeat_penalty=req.repeat_penalty, seed=seed)
    return ChatRequest(tuple(messages), tuple(images), sampling, max_tokens, stops, fmt.type,
                       fmt.json_schema.schema_ if fmt.json_schema is not None else None, req.stream)
