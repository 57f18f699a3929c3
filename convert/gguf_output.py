"""Writing a GGUF whole or not at all, one tensor in memory at a time: what the converter
(writers.py) and the mmproj quantizer (quantize.py) share.

    with gguf_writer(path, "clip") as w:        # a temporary next to `path`, renamed into place at the end
        w.add_uint32(...)                       # metadata
        w.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=...)   # every tensor's info first
        write_data(w, [(name, load), ...], progress)                   # then each one's bytes

A failed or interrupted write leaves no partial .gguf behind (llava_local/fileio.py `atomic_path`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np

from llava_local.fileio import atomic_path


@contextlib.contextmanager
def gguf_writer(path: str | os.PathLike, arch: str) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter on a temporary file that replaces `path` when the block ends normally."""
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            yield writer
        finally:
            writer.close()


def write_data(writer: gguf.GGUFWriter, tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
               progress: Callable[[str], None] | None = None) -> None:
    """Write the header, the metadata and the tensor infos added so far, then each tensor's data,
    loaded only when its turn comes: `tensors` pairs each name with a loader, in tensor-info order."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, load in tensors:
        writer.write_tensor_data(load())
        if progress:
            progress(name)
