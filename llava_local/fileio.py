"""Files written whole or not at all, and JSON read with one kind of error: the one way the package
does either.

    with atomic_path("out/model.gguf") as tmp:     # any writer (gguf, torch.save, a directory's file)
        writer.write(tmp)
    atomic_write("cache.json", data)                # bytes at hand
    manifest = read_json("out/x.manifest.json", what="manifest")

A temporary next to the target (same file system), fsync, rename, then fsync of the folder: readers
see the old file or the new one, never part of it, and a power cut after the call keeps the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

from llava_local.errors import LlavaLocalError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (best effort: some file systems refuse a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block ends normally the temporary (a file or a
    directory) replaces `path`, otherwise it is removed. `sync=False` skips the fsyncs (scratch files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if sync and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            import shutil
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Readers see the old file or the new one, never part of it. Raises OSError (nothing left behind)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    """`obj` as indented UTF-8 JSON, atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike, *, what: str = "JSON file", error: type[Exception] = LlavaLocalError):
    """The parsed file; a missing, unreadable or malformed one raises `error` naming `what` and why."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({getattr(exc, 'strerror', None) or exc})") from None
    except ValueError as exc:
        raise error(f"{path}: {what} is not valid JSON ({exc})") from None
