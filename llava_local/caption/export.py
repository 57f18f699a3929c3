"""The caption job's other outputs: a caption file next to each image (`--sidecar`, kohya-style
a.jpg -> a.txt) and a CSV of the job's records (`--csv`), each written whole or not at all.

    check_sidecar_names(items, ".txt")            # before any work: two images, one sidecar?
    sidecars = Sidecars(".txt", overwrite=False, previous=records_by_key)
    sidecars.write(record)
    export_csv(Path("captions.csv"), records)

A sidecar that exists and was not written by this job (a human's caption) is kept unless the job
runs with --overwrite; the journal says which sidecars are the job's own.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Iterable, Sequence

from llava_local.caption.journal import write_whole
from llava_local.caption.worker import CaptionItem
from llava_local.errors import LlavaLocalError

log = logging.getLogger(__name__)


def sidecar_path(image_path: str, ext: str) -> Path:
    return Path(image_path).with_suffix(ext)


def check_sidecar_names(items: Sequence[CaptionItem], ext: str) -> None:
    seen: dict[Path, str] = {}
    for it in items:
        dst = sidecar_path(it.path, ext)
        if dst in seen:
            raise LlavaLocalError(f"{seen[dst]} and {it.path} would both write {dst}: rename one, or use the JSONL")
        seen[dst] = it.path


class Sidecars:
    """Writes `--sidecar` files; `previous` (every earlier record by key) tells which are ours."""

    def __init__(self, ext: str, *, overwrite: bool, previous: dict[str, dict]):
        self.ext = ext
        self.overwrite = overwrite
        self.ours = {str(sidecar_path(r["path"], ext)): r.get("caption")   # earlier runs': replaceable
                     for r in previous.values() if r.get("status") == "ok" and r.get("path")}

    def restore(self, records: Iterable[dict]) -> None:
        """Write the missing sidecars of finished records (the job was killed between the two)."""
        for r in records:
            if r.get("status") == "ok" and not sidecar_path(r["path"], self.ext).exists():
                self._write(r, overwrite=True)

    def write(self, rec: dict) -> None:
        self._write(rec, overwrite=self.overwrite)

    def _write(self, rec: dict, *, overwrite: bool) -> None:
        dst = sidecar_path(rec["path"], self.ext)
        if dst.exists() and not overwrite and self.ours.get(str(dst)) is None:
            log.warning("%s exists and was not written by this job: kept (use --overwrite)", dst)
            return
        write_whole(dst, (rec["caption"] + "\n").encode("utf-8"))


def export_csv(path: Path, records: Iterable[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "path", "status", "caption", "error"])
    for r in records:
        w.writerow([r["key"], r.get("path", ""), r.get("status", ""), r.get("caption") or "", r.get("error") or ""])
    write_whole(Path(path), buf.getvalue().encode("utf-8"))
