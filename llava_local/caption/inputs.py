"""What a caption job reads: image files, directories, globs, lists of paths and JSONL files become
(key, path) items; `--shard i/n` keeps the keys of one machine.

    items = discover_inputs(["photos/", "more/*.png", "list.txt", "meta.jsonl"])
    mine = [it for it in items if in_shard(it.key, parse_shard("0/4"))]

An item's key is its identity in the journal (resume, shards): the path as given or found, or as
written in a list, or a JSONL field. A missing or unreadable image is still an item: it gets an
error record instead of silently vanishing from the job.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from llava_local.caption.worker import CaptionItem
from llava_local.errors import LlavaLocalError

log = logging.getLogger(__name__)

# Images by extension when walking directories. The allow-list of image/load.py refuses the second
# line, but such files are listed so that each gets an error record instead of silently vanishing.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".heic", ".heif",
                    ".tif", ".tiff", ".psd", ".eps", ".fits", ".fit", ".fpx", ".ico", ".jp2", ".avif")
LIST_SUFFIXES = (".txt", ".lst")            # a text file of paths, one per line
JSONL_SUFFIXES = (".jsonl", ".ndjson")      # a JSONL with a path field


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _walk(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Entries under `root` named like images, sorted; hidden entries (".x", macOS "._x.jpg") skipped.
    An entry with an image name is an item whatever it is (a directory named x.jpg, a broken link):
    it then gets an error record rather than being ignored."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            if d.lower().endswith(extensions):
                out.append(os.path.join(dirpath, d))
                dirnames.remove(d)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if not f.startswith(".") and f.lower().endswith(extensions))
    return sorted(out)


def _read_list(path: Path) -> list[CaptionItem]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LlavaLocalError(f"{path}: cannot read the list of images ({exc})") from None
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(CaptionItem(line, str(path.parent / line) if not os.path.isabs(line) else line))
    return out


def _read_jsonl(path: Path, path_field: str, key_field: str | None) -> list[CaptionItem]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise LlavaLocalError(f"{path}:{n}: not JSON ({exc})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(path_field), str):
                    raise LlavaLocalError(f"{path}:{n}: no string field {path_field!r} (set --path-field)")
                p = obj[path_field]
                key = obj.get(key_field) if key_field else p
                if key_field and not isinstance(key, (str, int)):
                    raise LlavaLocalError(f"{path}:{n}: no field {key_field!r} (set --key-field)")
                out.append(CaptionItem(str(key), p if os.path.isabs(p) else str(path.parent / p)))
    except OSError as exc:
        raise LlavaLocalError(f"{path}: cannot read ({exc})") from None
    except UnicodeDecodeError as exc:
        raise LlavaLocalError(f"{path}: not UTF-8 text ({exc})") from None
    return out


def discover_inputs(inputs: Sequence[str], *, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                    path_field: str = "path", key_field: str | None = None) -> list[CaptionItem]:
    """Image files, directories (recursive, by extension), globs, text files of paths (.txt/.lst)
    and JSONL files (.jsonl, `path_field`; key from `key_field`, else the path as written).

    Keys are paths as given or found (relative to the current directory) or as written in the
    list; paths in a list file are relative to that file. The first item of a key wins."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    items: list[CaptionItem] = []
    for inp in inputs:
        if os.path.isdir(inp) and not inp.lower().endswith(exts):
            items += [CaptionItem(p, p) for p in _walk(inp, exts)]
        elif os.path.isfile(inp) and inp.lower().endswith(LIST_SUFFIXES):
            items += _read_list(Path(inp))
        elif os.path.isfile(inp) and inp.lower().endswith(JSONL_SUFFIXES):
            items += _read_jsonl(Path(inp), path_field, key_field)
        elif not os.path.lexists(inp) and _has_glob(inp):
            matches = sorted(glob.glob(inp, recursive=True))
            if not matches:
                log.warning("%s: matches no file", inp)
            for m in matches:
                if os.path.isdir(m) and not m.lower().endswith(exts):
                    items += [CaptionItem(p, p) for p in _walk(m, exts)]
                elif m.lower().endswith(exts) or os.path.isfile(m):
                    items.append(CaptionItem(m, m))
        else:   # an image (a missing or unreadable one gets its error record)
            items.append(CaptionItem(inp, inp))
    seen, out = set(), []
    for it in items:
        if it.key not in seen:
            seen.add(it.key)
            out.append(it)
    if len(out) < len(items):
        log.info("%d duplicate keys ignored", len(items) - len(out))
    return out


def parse_shard(spec: str) -> tuple[int, int]:
    """"i/n" with 0 <= i < n."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise LlavaLocalError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise LlavaLocalError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Stable across machines and Python versions (not `hash()`, which is salted per process)."""
    if shard is None:
        return True
    i, n = shard
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % n == i
