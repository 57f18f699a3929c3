"""Bounded, pure-Python GGUF header reader: the preflight every GGUF passes before llama.cpp sees it.

llama.cpp's own loader has aborted or over-allocated on hostile headers (CVE-2024-23605,
CVE-2024-21802, CVE-2025-53630) and reports a partial download as an opaque load failure
(llama.cpp #6885). This module reads only the header (metadata and tensor infos, never tensor
data), checks every count and length against the bytes actually left in the file *before*
allocating anything, applies the same structural rules as llama.cpp's `gguf_init_from_file_impl`,
and raises `ModelFilesError` with a one-line message that names the file and the reason.

    from llava_local.formats.gguf_check import read_gguf_info
    info = read_gguf_info("model.gguf")      # raises ModelFilesError on a bad file
    info.architecture, info.require("clip.projector_type"), info.tensors["v.patch_embd.weight"].shape

Command line (prints a summary or the error):  python -m llava_local.formats.gguf_check model.gguf
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from dataclasses import dataclass
from typing import BinaryIO

import gguf

from llava_local.errors import ModelFilesError
from llava_local.logs import setup_logging

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)     # v1 used 32-bit counts and is gone from llama.cpp; v2 and v3 share a layout
HEADER_SIZE = 24                # magic u32, version u32, n_tensors u64, n_kv u64
GGML_MAX_DIMS = 4               # ggml.h
GGML_MAX_NAME = 64              # ggml.h: tensor names must be shorter than this (NUL included)
INT64_MAX = 2**63 - 1
MAX_ARRAY_DEPTH = 2             # llama.cpp rejects nested arrays; gguf-py can write one level of nesting
MAX_ALIGNMENT = 2**20           # llama.cpp has no cap, but no writer uses more than a page; 2^31 is an attack
# Smallest possible encodings, used to refuse counts that cannot fit in the file before allocating:
MIN_KV_BYTES = 8 + 4 + 1        # empty key (u64 length), value type u32, 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8   # empty name, n_dims u32, type u32, offset u64 (the dims come on top)

VT = gguf.GGUFValueType
# value type -> (struct format char, size in bytes) for the fixed-size scalar types
_SCALARS = {
    VT.UINT8: ("B", 1), VT.INT8: ("b", 1), VT.UINT16: ("H", 2), VT.INT16: ("h", 2),
    VT.UINT32: ("I", 4), VT.INT32: ("i", 4), VT.FLOAT32: ("f", 4), VT.BOOL: ("?", 1),
    VT.UINT64: ("Q", 8), VT.INT64: ("q", 8), VT.FLOAT64: ("d", 8),
}
_MIN_ELEMENT_BYTES = {**{t: size for t, (_, size) in _SCALARS.items()}, VT.STRING: 8, VT.ARRAY: 12}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]     # ggml order (ne0 first), as stored
    ggml_type: int             # gguf.GGMLQuantizationType value
    offset: int                # relative to the data section start
    nbytes: int


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    version: int
    alignment: int
    data_offset: int           # absolute file offset of the tensor data section
    metadata: dict[str, object]   # key -> python value (str, int, float, bool, list)
    tensors: dict[str, TensorInfo]
    file_size: int

    def get(self, key: str, default: object = None) -> object:
        return self.metadata.get(key, default)

    def require(self, key: str) -> object:
        if key not in self.metadata:
            raise ModelFilesError(f"{self.path}: missing metadata key {key}")
        return self.metadata[key]

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get(gguf.Keys.General.ARCHITECTURE)
        return arch if isinstance(arch, str) else None


class _Reader:
    """Little-endian reads that never ask for more bytes than the file has left."""

    def __init__(self, f: BinaryIO, path: str, file_size: int, pos: int):
        self.f, self.path, self.file_size, self.pos = f, path, file_size, pos

    @property
    def left(self) -> int:
        return self.file_size - self.pos

    def fail(self, reason: str) -> ModelFilesError:
        return ModelFilesError(f"{self.path}: {reason}")

    def truncated(self, reason: str) -> ModelFilesError:
        return self.fail(f"incomplete or not a GGUF file ({reason})")

    def read(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise self.truncated(f"{what} needs {n} bytes at offset {self.pos}, only {self.left} left")
        data = self.f.read(n)
        if len(data) != n:   # the file shrank while we read it
            raise self.truncated(f"{what}: short read at offset {self.pos}")
        self.pos += n
        return data

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.read(8, what))[0]

    def string(self, what: str, max_string: int, index: int | None = None) -> str:
        """A u64-length-prefixed UTF-8 string; `index` names an array element (label built on error only)."""
        n = struct.unpack("<Q", self.read(8, what))[0]
        if n > self.left:
            raise self.truncated(f"{_label(what, index)} claims {n} bytes at offset {self.pos}, only {self.left} left")
        if n > max_string:
            raise self.fail(f"{_label(what, index)} is {n} bytes, more than the {max_string}-byte limit")
        # llama.cpp does not validate UTF-8; replace rather than refuse a file it would load
        return self.read(n, what).decode("utf-8", errors="replace")


def _label(what: str, index: int | None) -> str:
    return what if index is None else f"{what}[{index}]"


def _value(r: _Reader, vtype: int, what: str, limits: dict[str, int], depth: int = 0) -> object:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return struct.unpack("<" + fmt, r.read(size, what))[0]
    if vtype == VT.STRING:
        return r.string(what, limits["max_string"])
    if vtype != VT.ARRAY:
        raise r.fail(f"{what} has unknown GGUF value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        raise r.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
    etype = r.u32(f"{what} array element type")
    count = r.u64(f"{what} array length")
    if etype not in _MIN_ELEMENT_BYTES:
        raise r.fail(f"{what} is an array of unknown GGUF value type {etype}")
    if count * _MIN_ELEMENT_BYTES[etype] > r.left:
        raise r.truncated(f"{what} claims {count} array elements at offset {r.pos}, only {r.left} bytes left")
    if count > limits["max_array"]:
        raise r.fail(f"{what} has {count} array elements, more than the limit {limits['max_array']}")
    if etype in _SCALARS:   # one read and one unpack for the whole array (token scores, types)
        fmt, size = _SCALARS[etype]
        return list(struct.unpack(f"<{count}{fmt}", r.read(count * size, what)))
    if etype == VT.STRING:  # vocabularies and merges: 100k+ elements, keep the loop lean
        return [r.string(what, limits["max_string"], i) for i in range(count)]
    return [_value(r, etype, f"{what}[{i}]", limits, depth + 1) for i in range(count)]


def _tensor_info(r: _Reader, index: int, max_string: int) -> tuple[str, tuple[int, ...], int, int, int]:
    """Read one tensor info and check it on its own: name, dims, type, element count, byte size."""
    name = r.string(f"tensor {index} name", max_string)
    if len(name.encode("utf-8")) >= GGML_MAX_NAME:
        raise r.fail(f"tensor {index} name {name[:80]!r} is longer than {GGML_MAX_NAME - 1} bytes")
    n_dims = r.u32(f"tensor {name!r} n_dims")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise r.fail(f"tensor {name!r} has {n_dims} dimensions, GGML supports 1..{GGML_MAX_DIMS}")
    shape = struct.unpack(f"<{n_dims}Q", r.read(8 * n_dims, f"tensor {name!r} dims"))
    if any(d == 0 or d > INT64_MAX for d in shape):
        raise r.fail(f"tensor {name!r} has invalid shape {list(shape)} (each dimension must be in 1..2^63-1)")
    n_elements = 1
    for d in shape:
        n_elements *= d
    if n_elements > INT64_MAX:
        raise r.fail(f"tensor {name!r} shape {list(shape)} has more than 2^63-1 elements")
    type_id = r.u32(f"tensor {name!r} type")
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise r.fail(f"tensor {name!r} has unknown ggml type {type_id}") from None
    if shape[0] % block_size:
        raise r.fail(f"tensor {name!r} of type {qtype.name} has {shape[0]} elements per row, "
                     f"not a multiple of the block size {block_size}")
    nbytes = n_elements // block_size * type_size
    offset = r.u64(f"tensor {name!r} offset")
    return name, shape, type_id, offset, nbytes


def read_gguf_info(
    path: str | os.PathLike,
    *,
    max_kv: int = 2**16,         # real LLM / mmproj GGUFs carry 20-60 keys
    max_tensors: int = 2**16,    # the largest MoE GGUFs have a few thousand tensor infos
    max_string: int = 2**25,     # 32 MiB: `tokenizer.huggingface.json` can hold a whole tokenizer.json
    max_array: int = 2**22,      # 4M elements: vocabularies are <= 262k (Gemma), merges about as many
) -> GGUFInfo:
    """Read and validate the header of a GGUF file; raise ModelFilesError if it is not sound.

    Reads only the header, so it takes milliseconds on a multi-GB model. Every claimed count or
    length is checked against the bytes left in the file before anything is allocated, so a
    hostile header fails fast with bounded memory.
    """
    path_s = os.fspath(path)
    try:
        file_size = os.path.getsize(path_s)
        f = open(path_s, "rb", buffering=1 << 20)
    except OSError as e:
        raise ModelFilesError(f"{path_s}: cannot open GGUF file ({e.strerror or e})") from None
    with f:
        return _read(f, path_s, file_size, dict(max_kv=max_kv, max_tensors=max_tensors,
                                                max_string=max_string, max_array=max_array))


def _read(f: BinaryIO, path: str, file_size: int, limits: dict[str, int]) -> GGUFInfo:
    head = f.read(HEADER_SIZE)
    r = _Reader(f, path, file_size, len(head))
    if head[:4] != GGUF_MAGIC:
        raise r.truncated(f"bad magic {head[:4]!r}, expected {GGUF_MAGIC!r}")
    if len(head) < 8:
        raise r.truncated(f"{file_size} bytes, the header needs {HEADER_SIZE}")
    version = struct.unpack_from("<I", head, 4)[0]
    if version & 0xFFFF == 0 and version != 0:
        raise r.fail(f"big-endian GGUF (version field reads {version:#010x}); only little-endian GGUF is supported")
    if version == 1:
        raise r.fail("GGUF version 1 is obsolete and no longer loadable; re-convert the model")
    if version not in SUPPORTED_VERSIONS:
        raise r.fail(f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    if len(head) < HEADER_SIZE:
        raise r.truncated(f"{file_size} bytes, the header needs {HEADER_SIZE}")
    n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)

    # Both counts against the bytes that remain, before a single KV or tensor info is read.
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > r.left:
        raise r.truncated(f"header claims {n_kv} metadata pairs and {n_tensors} tensors, "
                          f"which cannot fit in the {r.left} bytes after the header")
    if n_kv > limits["max_kv"]:
        raise r.fail(f"header claims {n_kv} metadata pairs, more than the limit {limits['max_kv']}")
    if n_tensors > limits["max_tensors"]:
        raise r.fail(f"header claims {n_tensors} tensors, more than the limit {limits['max_tensors']}")

    metadata: dict[str, object] = {}
    value_types: dict[str, int] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key {i}", limits["max_string"])
        if key in metadata:
            raise r.fail(f"duplicate metadata key {key!r}")
        vtype = r.u32(f"metadata {key!r} type")
        metadata[key] = _value(r, vtype, f"metadata {key!r}", limits)
        value_types[key] = vtype

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    if gguf.Keys.General.ALIGNMENT in metadata:
        alignment = metadata[gguf.Keys.General.ALIGNMENT]
        # llama.cpp reads it with gguf_get_val_u32, which aborts on any other type
        if value_types[gguf.Keys.General.ALIGNMENT] != VT.UINT32:
            raise r.fail(f"{gguf.Keys.General.ALIGNMENT} must be a uint32, got {alignment!r}")
        if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise r.fail(f"{gguf.Keys.General.ALIGNMENT} = {alignment} is not a power of two in 1..{MAX_ALIGNMENT}")

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        info = _tensor_info(r, i, limits["max_string"])
        if info[0] in names:
            raise r.fail(f"duplicate tensor name {info[0]!r}")
        names.add(info[0])
        infos.append(info)

    data_offset = -(-r.pos // alignment) * alignment
    if data_offset > file_size:
        raise r.truncated(f"tensor data section starts at {data_offset}, past the end of the {file_size}-byte file")

    # llama.cpp requires tensor i to start where tensor i-1 ends, padded to the alignment
    tensors: dict[str, TensorInfo] = {}
    expected = 0
    for name, shape, type_id, offset, nbytes in infos:
        if offset % alignment:
            raise r.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        if offset != expected:
            raise r.fail(f"tensor {name!r} starts at data offset {offset}, expected {expected} "
                         "(tensors must be packed in order)")
        end = data_offset + offset + nbytes
        if end > file_size:
            raise r.truncated(f"tensor {name!r} data past end of file: ends at byte {end}, "
                              f"file has {file_size}; truncated download?")
        tensors[name] = TensorInfo(name, shape, type_id, offset, nbytes)
        expected = offset + -(-nbytes // alignment) * alignment

    log.debug("%s: GGUF v%d, %d metadata keys, %d tensors, data at %d",
              path, version, len(metadata), len(tensors), data_offset)
    return GGUFInfo(path, version, alignment, data_offset, metadata, tensors, file_size)


if __name__ == "__main__":
    setup_logging(True)
    for p in sys.argv[1:]:
        try:
            gi = read_gguf_info(p)
        except ModelFilesError as e:
            print(f"Error: {e}", file=sys.stderr)
            continue
        print(f"{p}: GGUF v{gi.version} arch={gi.architecture} keys={len(gi.metadata)} tensors={len(gi.tensors)}")
