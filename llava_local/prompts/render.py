"""How the runtime turns a conversation into prompt text: a named template (templates.py) or a GGUF's
own `tokenizer.chat_template` rendered in a Jinja sandbox.

Both render to one string in which images are IMAGE_MARKER and BOS/EOS are their token texts; the
chat session tokenizes only what a new turn appends to that string (KV-cache reuse).

GGUF templates are untrusted (CVE-2024-34359): they run in Jinja's immutable sandbox, with bounded
string/list growth and a wall-clock limit, and a template that fails or misbehaves on a probe
conversation is dropped for the named template with a warning, so the model still loads.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Sequence

from llava_local.errors import TemplateError
from llava_local.prompts.templates import IMAGE_MARKER, Message, Template, get_template

log = logging.getLogger(__name__)

MAX_RENDER_CHARS = 1_000_000     # a prompt longer than this is no chat prompt
RENDER_SECONDS = 2.0             # wall-clock limit for one render (main thread only: SIGALRM)


class PromptFormat(abc.ABC):
    name: str

    @abc.abstractmethod
    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        """The conversation as one string: images as IMAGE_MARKER, BOS/EOS as their token texts."""


@dataclass
class NamedFormat(PromptFormat):
    template: Template
    bos_text: str      # "" when the tokenizer adds no BOS
    eos_text: str

    @property
    def name(self) -> str:
        return self.template.name

    def render(self, messages, *, add_generation_prompt):
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt, eos_text=self.eos_text)
        return self.bos_text + text


def _bounded_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 64:
                    raise TemplateError("exponent too large in chat template")
                return left ** right
            if operator == "*":
                n = right if isinstance(right, int) else left if isinstance(left, int) else None
                seq = left if isinstance(left, (str, list, tuple)) else right if isinstance(right, (str, list, tuple)) else None
                if seq is not None and n is not None and len(seq) * max(n, 0) > MAX_RENDER_CHARS:
                    raise TemplateError("chat template builds a string that is too large")
                return left * right
            result = left + right
            if isinstance(result, (str, list)) and len(result) > MAX_RENDER_CHARS:
                raise TemplateError("chat template builds a string that is too large")
            return result

    env = BoundedSandbox(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise
    return env


def _raise(msg):
    raise TemplateError(f"chat template raised: {msg}")


@contextlib.contextmanager
def _time_limit(seconds: float):
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(*_):
        raise TemplateError(f"chat template took longer than {seconds:g}s to render")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class JinjaFormat(PromptFormat):
    name = "gguf-jinja"

    def __init__(self, source: str, bos_text: str, eos_text: str):
        from jinja2 import TemplateError as JinjaError
        self._jinja_error = JinjaError
        self.bos_text, self.eos_text = bos_text, eos_text
        try:
            self._tmpl = _bounded_sandbox().from_string(source)
        except JinjaError as exc:
            raise TemplateError(f"chat template does not parse: {exc}") from None

    def render(self, messages, *, add_generation_prompt):
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        try:
            with _time_limit(RENDER_SECONDS):
                out = self._tmpl.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_text, eos_token=self.eos_text)
        except TemplateError:
            raise
        except (self._jinja_error, RecursionError, MemoryError, OverflowError, TypeError, ValueError,
                AttributeError, KeyError, IndexError) as exc:
            raise TemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None
        if len(out) > MAX_RENDER_CHARS:
            raise TemplateError("chat template rendered an oversized prompt")
        return out


_PROBE = [Message("user", IMAGE_MARKER + "\nWhat is this?"), Message("assistant", "A probe."),
          Message("user", "And now?")]


def jinja_body(jinja: str) -> str:
    """A template without its leading Jinja comment: files converted before the comment that lets
    llama.cpp detect vicuna_v1 (templates.py) hold the same template without it."""
    if jinja.startswith("{#"):
        end = jinja.find("#}")
        if end >= 0:
            return jinja[end + 2:]
    return jinja


def choose_format(*, override: str | None, gguf_template: str | None, named: str | None,
                  bos_text: str, eos_text: str) -> PromptFormat:
    """--template, else the GGUF's Jinja (sandboxed; our own converter's is recognised by name),
    else the manifest's named template, else vicuna_v1."""
    if override:
        return NamedFormat(get_template(override), bos_text, eos_text)
    if named and gguf_template and jinja_body(gguf_template) == jinja_body(get_template(named).jinja):
        return NamedFormat(get_template(named), bos_text, eos_text)   # our converter wrote both
    if gguf_template:
        try:
            fmt = JinjaFormat(gguf_template, bos_text, eos_text)
            probe = fmt.render(_PROBE, add_generation_prompt=True)
            if probe.count(IMAGE_MARKER) != 1 or "And now?" not in probe:
                raise TemplateError("it drops the conversation's content")
            return fmt
        except TemplateError as exc:
            log.warning("ignoring the GGUF's chat template (%s); using %s", exc, named or "vicuna_v1")
    return NamedFormat(get_template(named or "vicuna_v1"), bos_text, eos_text)
