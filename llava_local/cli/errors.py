"""Library errors at the command line: one `Error: ...` line and exit status 1; the traceback only
with `llava-local --debug`. Every command wraps its work in `domain_errors`."""
from __future__ import annotations

import functools

import click

from llava_local.errors import LlavaLocalError


def domain_errors(fn):
    """Turn library errors into one clean line (traceback only with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except LlavaLocalError as exc:
            if (ctx.find_root().params or {}).get("debug"):
                raise
            raise click.ClickException(str(exc)) from None
    return wrapper
