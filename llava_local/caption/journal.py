"""The caption job's journal: its output JSONL, written so that a killed job loses nothing it finished.

    state = read_journal(Path("captions.jsonl"))      # records, and what a crash left (torn tail, garbage)
    w = JournalWriter(Path("captions.jsonl"))
    w.write({"key": "a.jpg", "status": "ok", "caption": "A cat."})
    w.close()

One whole record per line, written with a single `write` and so handed to the OS at once (a
killed process cannot tear it), fsynced every FSYNC_INTERVAL_S and at the end (a power cut loses
at most those seconds). A torn last line (a power cut mid-write) and unparsable lines are found by
`read_journal`; the job (job.py) cuts them off or rewrites the file whole with `rewrite_journal`.
"""
from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from llava_local import fileio
from llava_local.errors import LlavaLocalError

FSYNC_INTERVAL_S = 5.0                      # at most this much finished work lost to a power cut


class CaptionOutputError(LlavaLocalError):
    """The output file cannot be read, written or repaired."""


def write_whole(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, whole or not at all (fileio.atomic_write syncs the file and its
    folder); an OSError becomes the job's CaptionOutputError, naming the file."""
    try:
        fileio.atomic_write(path, data)
    except OSError as exc:
        raise CaptionOutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def encode_record(rec: dict) -> bytes:
    # json escapes "\n" inside strings, so one record is exactly one line
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


def rewrite_journal(path: Path, records: Iterable[dict]) -> None:
    """The journal replaced by exactly `records` (resume drops superseded and unparsable lines)."""
    write_whole(path, b"".join(encode_record(r) for r in records))


@dataclass
class JournalState:
    records: list[dict]        # parsed records, in file order
    good_bytes: int            # length of the whole, parsable prefix
    torn_tail: bool            # the file ends in a partial line
    bad_lines: int             # complete lines that did not parse (dropped on repair)


def read_journal(path: Path) -> JournalState:
    if not path.exists():
        return JournalState([], 0, False, 0)
    if not path.is_file():
        raise CaptionOutputError(f"{path}: the output is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaptionOutputError(f"{path}: cannot read the output to resume ({exc.strerror or exc})") from None
    records, bad, pos, good = [], 0, 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break                            # torn last line: cut off on repair
        line = data[pos:nl]
        pos = nl + 1
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise ValueError("not a record")
        except (ValueError, UnicodeDecodeError):
            if line.strip():
                bad += 1
            continue
        records.append(rec)
        if bad == 0:
            good = pos
    return JournalState(records, good, pos < len(data), bad)


class JournalWriter:
    """Appends whole records: one os.write per record (a killed process cannot tear it), fsync at
    intervals and on close. A failed write (disk full) is cut back to the last whole record."""

    def __init__(self, path: Path, *, fsync_interval: float = FSYNC_INTERVAL_S):
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        try:
            if not os.path.lexists(self.path.parent):
                self.path.parent.mkdir(parents=True)
            created = not os.path.lexists(self.path)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CaptionOutputError(f"{self.path}: cannot open the output for writing "
                                     f"({exc.strerror or exc})") from None
        if created:      # the new file's name must survive a power cut as well as its records
            fileio.fsync_dir(self.path.parent)
        self.n_written = 0
        self._last_sync = time.monotonic()

    def write(self, rec: dict) -> None:
        data = encode_record(rec)
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                view = view[n:]
        except OSError as exc:
            try:
                os.ftruncate(self.fd, start)   # never leave half a record behind
            except OSError:
                pass
            raise CaptionOutputError(f"{self.path}: cannot write ({exc.strerror or exc}); it holds whole records "
                                     "only: free space and run the same command to resume") from None
        self.n_written += 1
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise CaptionOutputError(f"{self.path}: fsync failed ({exc.strerror or exc})") from None
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd is None:
            return
        try:
            self.sync()
        finally:
            os.close(self.fd)
            self.fd = None
