"""What every command shares at its edges: library errors become one `Error: ...` line (exit 1,
the traceback only with `llava-local --debug`), and logging goes to stderr, set up once here."""
from __future__ import annotations

import functools
import logging
import sys

import click

from llava_local.errors import LlavaLocalError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool, *, fmt: str = LOG_FORMAT, datefmt: str | None = None) -> None:
    """INFO with --verbose, else WARNING, to stderr (stdout carries results)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format=fmt,
                        datefmt=datefmt)


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
