"""Errors train/ raises for problems a user can fix: bad data files, bad options, missing files,
unsupported models.

They are LlavaLocalError subclasses, so `llava-local train` prints them as one `Error:` line, while
any other exception (a bug) keeps its traceback. They also keep the built-in type they were raised
as before (ValueError, FileNotFoundError), so existing `except` clauses still catch them.

    raise TrainDataError(f"{path}: record {rid!r}: turn 3: value must be a string")
"""
from __future__ import annotations

from llava_local.errors import LlavaLocalError


class TrainDataError(LlavaLocalError, ValueError):
    """LLaVA JSON data that cannot be trained on (unreadable, malformed, does not fit), or annotations
    that instruction data cannot be generated from."""


class TrainConfigError(LlavaLocalError, ValueError):
    """Options or models that do not go together (batch size vs processes, FSDP + LoRA, non-Llama LLM)."""


class TrainFilesError(LlavaLocalError, FileNotFoundError):
    """A file or directory training was pointed at is missing or is not what it should be (a --resume
    directory without trainer state, a GGUF path, a directory without tokenizer files)."""
