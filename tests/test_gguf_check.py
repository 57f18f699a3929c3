"""Tests for llava_local.formats.gguf_check: a real file written by gguf-py, then crafted hostile bytes.

Run:  .venv/bin/python -m pytest -q tests/test_gguf_check.py
"""

from __future__ import annotations

import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest

from llava_local.errors import ModelFilesError
from llava_local.formats.gguf_check import GGUFInfo, read_gguf_info

T = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType
MAX_SECONDS = 1.0
MAX_PEAK_BYTES = 200 * 2**20

# ---------------------------------------------------------------- a real file written by gguf-py

SCALARS = {  # key -> (writer method, value)
    "test.u8": ("add_uint8", 200), "test.i8": ("add_int8", -100),
    "test.u16": ("add_uint16", 60000), "test.i16": ("add_int16", -30000),
    "test.u32": ("add_uint32", 4_000_000_000), "test.i32": ("add_int32", -2_000_000_000),
    "test.u64": ("add_uint64", 2**63 + 5), "test.i64": ("add_int64", -(2**62)),
    "test.f32": ("add_float32", 0.5), "test.f64": ("add_float64", 1e-300),
    "test.bool": ("add_bool", True), "test.str": ("add_string", "héllo {{ chat }}"),
}
ARRAYS = {
    "test.arr_int": [1, -2, 3], "test.arr_float": [0.25, -1.5],
    "test.arr_str": ["<s>", "</s>", "▁a", ""], "test.arr_bool": [True, False],
}


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llava.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for key, (method, value) in SCALARS.items():
        getattr(w, method)(key, value)
    for key, value in ARRAYS.items():
        w.add_array(key, value)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 8)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), T.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=T.Q8_0)
    # last and large, so that cutting 1 % off the file cuts into tensor data
    w.add_tensor("output.weight", rng.standard_normal((64, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_real_file_matches_gguf_reader(real_gguf):
    info = read_gguf_info(real_gguf)
    ref = gguf.GGUFReader(real_gguf)
    assert isinstance(info, GGUFInfo)
    assert (info.version, info.alignment, info.data_offset) == (3, 32, ref.data_offset)
    assert info.file_size == real_gguf.stat().st_size
    assert list(info.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = info.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in t.shape)
        assert mine.ggml_type == t.tensor_type
        assert info.data_offset + mine.offset == t.data_offset
        assert mine.nbytes == t.n_bytes
    assert info.tensors["blk.0.attn_q.weight"].ggml_type == T.Q8_0
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):   # reader's pseudo-fields for the header counts
            continue
        assert info.metadata[key] == pytest.approx(field.contents()), key


def test_real_file_values_and_accessors(real_gguf):
    info = read_gguf_info(real_gguf)
    for key, (_, value) in SCALARS.items():
        assert info.metadata[key] == pytest.approx(value), key
    for key, value in ARRAYS.items():
        assert info.metadata[key] == pytest.approx(value), key
    assert info.architecture == "llama"
    assert info.get("nope", 7) == 7
    assert info.require("test.str") == "héllo {{ chat }}"
    with pytest.raises(ModelFilesError, match=r"tiny-llava\.gguf: missing metadata key clip\.projector_type"):
        info.require("clip.projector_type")
    assert info.path == str(real_gguf) and info.version == 3     # read as a GGUF: the magic was there


def test_not_a_gguf_and_missing_file(tmp_path):
    other = tmp_path / "x.bin"
    other.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ModelFilesError, match=r"x\.bin: incomplete or not a GGUF file \(bad magic b'PK\\x03\\x04'"):
        read_gguf_info(other)
    with pytest.raises(ModelFilesError, match="absent.gguf: cannot open"):
        read_gguf_info(tmp_path / "absent.gguf")


@pytest.mark.parametrize("where", ["10-bytes", "mid-metadata", "99-percent"])
def test_truncated_real_file(real_gguf, tmp_path, where):
    data = real_gguf.read_bytes()
    n = {"10-bytes": 10,
         "mid-metadata": read_gguf_info(real_gguf).data_offset // 2,   # inside the KV section
         "99-percent": len(data) * 99 // 100}[where]
    cut = tmp_path / f"cut-{n}.gguf"
    cut.write_bytes(data[:n])
    with pytest.raises(ModelFilesError, match="incomplete or not a GGUF file") as e:
        read_gguf_info(cut)
    assert cut.name in str(e.value)
    # gguf-py's own reader also refuses it (or, for the header cuts, fails outright)
    with pytest.raises(Exception):
        gguf.GGUFReader(cut)


# ---------------------------------------------------------------- crafted bytes

def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32_kv(key: str, value: int) -> bytes:
    return kv(key, VT.UINT32, struct.pack("<I", value))


def arr(etype: int, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", etype, count) + payload


def tinfo(name: str, dims, ggml_type: int = T.F32, offset: int = 0, n_dims: int | None = None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", n, *dims, ggml_type, offset)


ARCH = kv("general.architecture", VT.STRING, s("llama"))
T0 = tinfo("t0", [8])   # 32 bytes of F32 at offset 0


def gguf_bytes(kvs=(ARCH,), tensors=(T0,), data=bytes(32), *, magic=b"GGUF", version=3,
               n_kv=None, n_tensors=None, align=32, version_fmt="<I") -> bytes:
    head = magic + struct.pack(version_fmt, version) + struct.pack(
        "<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + bytes(-len(body) % align) + data


def test_crafted_baseline_is_valid(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf_bytes(tensors=(T0, tinfo("t1", [16, 2], T.F16, 32)), data=bytes(32 + 64)))
    info = read_gguf_info(p)
    assert info.tensors["t1"].shape == (16, 2) and info.tensors["t1"].nbytes == 64
    assert [t.name for t in gguf.GGUFReader(p).tensors] == ["t0", "t1"]


BIG = 2**63
BAD = {  # id -> (bytes, substring expected in the message)
    "bad-magic": (gguf_bytes(magic=b"GGML"), "incomplete or not a GGUF file (bad magic b'GGML'"),
    "empty": (b"", "incomplete or not a GGUF file (bad magic b''"),
    "version-1": (gguf_bytes(version=1), "version 1 is obsolete"),
    "version-99": (gguf_bytes(version=99), "unsupported GGUF version 99"),
    "version-0": (gguf_bytes(version=0), "unsupported GGUF version 0"),
    "big-endian": (gguf_bytes(version_fmt=">I"), "big-endian GGUF"),
    "header-only-20-bytes": (gguf_bytes()[:20], "incomplete or not a GGUF file"),
    "n_kv-2^63": (gguf_bytes(n_kv=BIG), f"claims {BIG} metadata pairs"),
    "n_kv-2^64-1": (gguf_bytes(n_kv=2**64 - 1), "cannot fit"),
    "n_tensors-2^63": (gguf_bytes(n_tensors=BIG), f"and {BIG} tensors"),
    "n_kv-over-limit": (gguf_bytes(kvs=(ARCH,) * 4, n_kv=70_000, data=bytes(70_000 * 13)), "more than the limit"),
    "key-len-2^64-1": (gguf_bytes(kvs=(struct.pack("<Q", 2**64 - 1) + b"general",)),
                       "claims 18446744073709551615 bytes"),
    "value-len-2^64-1": (gguf_bytes(kvs=(kv("general.name", VT.STRING, struct.pack("<Q", 2**64 - 1)),)),
                         "incomplete or not a GGUF file (metadata 'general.name' claims"),
    "u8-array-2^62": (gguf_bytes(kvs=(kv("a", VT.ARRAY, arr(VT.UINT8, 2**62)),)), f"claims {2**62} array elements"),
    "str-array-2^62": (gguf_bytes(kvs=(kv("tokenizer.ggml.tokens", VT.ARRAY, arr(VT.STRING, 2**62)),)),
                       "array elements"),
    "array-truncated-mid-element": (gguf_bytes(kvs=(kv("a", VT.ARRAY, arr(VT.STRING, 2, s("ab") + s("x" * 100)[:10])),),
                                               tensors=(), data=b"", align=1),
                                    "incomplete or not a GGUF file (metadata 'a'[1] claims 100 bytes"),
    "nested-arrays-3-deep": (gguf_bytes(kvs=(kv("a", VT.ARRAY, arr(VT.ARRAY, 1, arr(VT.ARRAY, 1, arr(VT.UINT8, 0)))),)),
                             "nests arrays deeper"),
    "unknown-value-type": (gguf_bytes(kvs=(kv("a", 13, b"\0" * 8),)), "unknown GGUF value type 13"),
    "unknown-array-type": (gguf_bytes(kvs=(kv("a", VT.ARRAY, arr(99, 1, b"\0")),)), "unknown GGUF value type 99"),
    "duplicate-key": (gguf_bytes(kvs=(ARCH, ARCH)), "duplicate metadata key 'general.architecture'"),
    "n_dims-0": (gguf_bytes(tensors=(tinfo("t0", [], n_dims=0),)), "has 0 dimensions"),
    "n_dims-5": (gguf_bytes(tensors=(tinfo("t0", [1, 1, 1, 1, 8]),)), "has 5 dimensions"),
    "n_dims-0xFFFFFFFF": (gguf_bytes(tensors=(tinfo("t0", [], n_dims=0xFFFFFFFF),)), "has 4294967295 dimensions"),
    "dim-0": (gguf_bytes(tensors=(tinfo("t0", [8, 0]),)), "invalid shape [8, 0]"),
    "dim-2^64-1": (gguf_bytes(tensors=(tinfo("t0", [2**64 - 1]),)), "invalid shape"),
    "numel-overflow": (gguf_bytes(tensors=(tinfo("t0", [2**32, 2**32]),)), "more than 2^63-1 elements"),
    "unknown-ggml-type-4": (gguf_bytes(tensors=(tinfo("t0", [8], ggml_type=4),)), "unknown ggml type 4"),
    "unknown-ggml-type-9999": (gguf_bytes(tensors=(tinfo("t0", [8], ggml_type=9999),)), "unknown ggml type 9999"),
    "q8_0-row-not-block-multiple": (gguf_bytes(tensors=(tinfo("t0", [40], T.Q8_0),)), "not a multiple of the block size 32"),
    "name-too-long": (gguf_bytes(tensors=(tinfo("x" * 64, [8]),)), "longer than 63 bytes"),
    "duplicate-tensor": (gguf_bytes(tensors=(T0, tinfo("t0", [8], offset=32)), data=bytes(64)),
                         "duplicate tensor name 't0'"),
    "data-past-eof": (gguf_bytes(tensors=(tinfo("t0", [1024]),)), "tensor 't0' data past end of file"),
    "huge-tensor-past-eof": (gguf_bytes(tensors=(tinfo("t0", [2**31, 2**31]),)), "data past end of file"),
    "offset-not-aligned": (gguf_bytes(tensors=(tinfo("t0", [8], offset=4),)), "offset 4 is not a multiple of the alignment 32"),
    "offset-not-packed": (gguf_bytes(tensors=(T0, tinfo("t1", [8], offset=64)), data=bytes(96)),
                          "starts at data offset 64, expected 32"),
    "offset-2^64-32": (gguf_bytes(tensors=(tinfo("t0", [8], offset=2**64 - 32),)), "expected 0"),
    "alignment-0": (gguf_bytes(kvs=(ARCH, u32_kv("general.alignment", 0))), "general.alignment = 0 is not a power of two"),
    "alignment-3": (gguf_bytes(kvs=(ARCH, u32_kv("general.alignment", 3))), "general.alignment = 3 is not a power of two"),
    "alignment-2^31": (gguf_bytes(kvs=(ARCH, u32_kv("general.alignment", 2**31))), "= 2147483648 is not a power of two in 1..1048576"),
    "alignment-not-u32": (gguf_bytes(kvs=(ARCH, kv("general.alignment", VT.UINT64, struct.pack("<Q", 64))), align=64),
                          "general.alignment must be a uint32"),
    # no tensors, but the header is not padded to the alignment: the file stops before its data section
    "data-section-past-eof": (gguf_bytes(tensors=(), data=b"", align=1), "data section starts at 96"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_crafted_bad_file(tmp_path, case):
    data, expected = BAD[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelFilesError) as e:
            read_gguf_info(path)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert expected in msg
    assert elapsed < MAX_SECONDS, f"{case}: {elapsed:.3f} s"
    assert peak < MAX_PEAK_BYTES, f"{case}: peak {peak / 2**20:.1f} MiB"


def test_limits_are_parameters(tmp_path):
    path = tmp_path / "long-string.gguf"
    path.write_bytes(gguf_bytes(kvs=(kv("general.name", VT.STRING, s("x" * 100)),)))
    assert read_gguf_info(path).get("general.name") == "x" * 100
    with pytest.raises(ModelFilesError, match="more than the 50-byte limit"):
        read_gguf_info(path, max_string=50)
    with pytest.raises(ModelFilesError, match="more than the limit 0"):
        read_gguf_info(path, max_tensors=0)
