"""Bounded validation of a safetensors header before the converter memory-maps the file.

A safetensors file is `u64 header length (LE) | JSON header | data section`. A hostile or
truncated file can claim a 2^64-1 byte header, tensors past the end of the file, or two tensors
sharing bytes. `check_safetensors` reads at most `max_header` bytes, applies the rules of the
reference Rust loader (known dtype, byte size == numel * itemsize, tensors packed back to back
and covering the data section exactly), and raises `ModelFilesError` naming the file and reason.

    from llava_local.formats.safetensors_check import check_safetensors
    layout = check_safetensors("model-00001-of-00002.safetensors")
    dtype, shape, (begin, end) = layout["model.embed_tokens.weight"]

Command line:  python -m llava_local.formats.safetensors_check a.safetensors [b.safetensors ...]
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys

from llava_local.errors import ModelFilesError
from llava_local.logs import setup_logging

log = logging.getLogger(__name__)

METADATA_KEY = "__metadata__"
# dtype -> bits per element, as in the safetensors crate's `Dtype::bitsize`
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,    # sub-byte MX formats, packed
}
TensorLayout = tuple[str, tuple[int, ...], tuple[int, int]]


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of two equal keys; a tensor listed twice is a corrupt header
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def check_safetensors(path: str | os.PathLike, *, max_header: int = 100 * 2**20) -> dict[str, TensorLayout]:
    """Validate a safetensors file's header; return name -> (dtype, shape, (begin, end)).

    `begin`/`end` are relative to the data section, which starts at byte 8 + header length.
    `max_header` bounds what is read and parsed (the Rust loader caps headers at 100 MB).
    """
    path_s = os.fspath(path)

    def fail(reason: str) -> ModelFilesError:
        return ModelFilesError(f"{path_s}: {reason}")

    try:
        file_size = os.path.getsize(path_s)
        with open(path_s, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise fail(f"incomplete or not a safetensors file ({file_size} bytes, need at least 8)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise fail(f"incomplete or not a safetensors file (header length {header_len} "
                           f"exceeds the {file_size - 8} bytes after the length field)")
            if header_len > max_header:
                raise fail(f"safetensors header is {header_len} bytes, more than the {max_header}-byte limit")
            raw = f.read(header_len)
    except OSError as e:
        raise fail(f"cannot read safetensors file ({e.strerror or e})") from None
    if len(raw) != header_len:
        raise fail("incomplete safetensors file (short read of the header)")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:   # JSONDecodeError is a ValueError
        raise fail(f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail(f"safetensors header is a JSON {type(header).__name__}, expected an object")

    meta = header.pop(METADATA_KEY, {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise fail(f"{METADATA_KEY} must map strings to strings")

    data_size = file_size - 8 - header_len
    layout: dict[str, TensorLayout] = {}
    for name, entry in header.items():
        layout[name] = _check_entry(name, entry, data_size, fail)

    # The Rust loader requires tensors packed back to back, covering the data section exactly.
    pos, prev = 0, None
    for name, (_, _, (begin, end)) in sorted(layout.items(), key=lambda kv: kv[1][2]):
        if begin < pos:
            raise fail(f"tensor {name!r} bytes [{begin}, {end}) overlap tensor {prev!r} (ends at {pos})")
        if begin > pos:
            raise fail(f"unreferenced bytes [{pos}, {begin}) before tensor {name!r}")
        pos, prev = end, name
    if pos != data_size:
        raise fail(f"data section has {data_size} bytes but the tensors cover {pos} (trailing data or bad header)")

    log.debug("%s: %d tensors, %d metadata keys, header %d bytes", path_s, len(layout), len(meta), header_len)
    return layout


def _check_entry(name: str, entry: object, data_size: int, fail) -> TensorLayout:
    if not isinstance(entry, dict):
        raise fail(f"tensor {name!r} entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise fail(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise fail(f"tensor {name!r} shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise fail(f"tensor {name!r} data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if begin > end:
        raise fail(f"tensor {name!r} data_offsets [{begin}, {end}] has begin > end")
    if end > data_size:
        raise fail(f"incomplete safetensors file: tensor {name!r} data past end of file "
                   f"(ends at data byte {end}, the data section has {data_size})")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise fail(f"tensor {name!r} {dtype}{shape} needs {bits / 8:g} bytes, data_offsets span {end - begin}")
    return dtype, tuple(shape), (begin, end)


if __name__ == "__main__":
    setup_logging(True)
    for p in sys.argv[1:]:
        try:
            print(f"{p}: {len(check_safetensors(p))} tensors OK")
        except ModelFilesError as e:
            print(f"Error: {e}", file=sys.stderr)
