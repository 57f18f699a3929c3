"""Errors train/ raises for problems a user can fix: bad data files, bad options, unsupported models.

They are LlavaLocalError subclasses, so `llava-local train` prints them as one `Error:` line, while
any other exception (a bug) keeps its traceback. They are also ValueErrors, as they were before.
"""
from __future__ import annotations

from llava_local.errors import LlavaLocalError


class TrainDataError(LlavaLocalError, ValueError):
    """LLaVA JSON data that cannot be trained on (unreadable, malformed, does not fit)."""


class TrainConfigError(LlavaLocalError, ValueError):
    """Options or models that do not go together (batch size vs processes, FSDP + LoRA, non-Llama LLM)."""
