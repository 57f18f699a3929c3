"""What each optimizer step reports, on rank 0 only: a line in OUT/train_log.jsonl, the progress bar
on stderr (tqdm, when installed and stderr is a terminal), or else a log line every --log-every steps.

    with StepLog(out, d, total_steps, start, log_every=10) as steps:
        for step in range(start, total_steps):
            ...
            steps.record(step + 1, loss, lr, tokens)
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from .distributed import Dist

log = logging.getLogger(__name__)


def _progress(d: Dist, total: int, start: int):
    if not d.is_main:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, disable=None)


class StepLog:
    """A context manager: the log file and the bar are closed when the loop ends, however it ends."""

    def __init__(self, out: Path, d: Dist, total: int, start: int, log_every: int):
        self.out, self.d, self.total, self.start, self.log_every = out, d, total, start, log_every
        self.file = None
        self.bar = None
        self.t0 = 0.0

    def __enter__(self) -> StepLog:
        self.file = open(self.out / "train_log.jsonl", "a") if self.d.is_main else None
        self.bar = _progress(self.d, self.total, self.start)
        self.t0 = time.perf_counter()
        return self

    def record(self, step: int, loss: float, lr: float, tokens: float) -> None:
        """Step `step` (1-based) ended with this loss, at this learning rate, over `tokens` labelled tokens."""
        if self.file:
            self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "tokens": int(tokens),
                                        "seconds": round(time.perf_counter() - self.t0, 3)}) + "\n")
            self.file.flush()
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif self.d.is_main and step % max(1, self.log_every) == 0:
            log.info("step %d/%d loss %.4f lr %.2e", step, self.total, loss, lr)

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.close()
        if self.file:
            self.file.close()
