"""Logging set-up, once per process: the command line (cli/) and the caption worker process call it.
Library modules only create loggers (`logging.getLogger(__name__)`); status goes to stderr so that
stdout carries results."""
from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool, *, fmt: str = LOG_FORMAT, datefmt: str | None = None) -> None:
    """INFO with --verbose, else WARNING, to stderr."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format=fmt,
                        datefmt=datefmt)
