"""Tests for llava_local.formats.safetensors_check: a file written by safetensors, then crafted headers.

Run:  .venv/bin/python -m pytest -q tests/test_safetensors_check.py
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from llava_local.errors import ModelFilesError
from llava_local.formats.safetensors_check import check_safetensors


def test_valid_file_matches_safe_open(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {
        "model.embed_tokens.weight": np.zeros((5, 3), np.float16),
        "multi_modal_projector.linear_1.bias": np.ones(7, np.float32),
        "lm_head.weight": np.zeros((2, 2, 2), np.int64),
        "empty": np.zeros((0, 4), np.float32),
        "flag": np.array([True, False]),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    layout = check_safetensors(path)
    assert set(layout) == set(tensors)
    with safe_open(str(path), "np") as f:
        for name in f.keys():
            dtype, shape, (begin, end) = layout[name]
            assert shape == tuple(f.get_slice(name).get_shape())
            assert dtype == f.get_slice(name).get_dtype()
            assert end - begin == tensors[name].nbytes
    assert layout["model.embed_tokens.weight"][:2] == ("F16", (5, 3))


def st_bytes(header: object, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


OK = {"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 8, 12)}
BAD = {  # id -> (bytes, substring expected in the message)
    "too-short": (b"\x01\x00", "need at least 8"),
    "header-len-2^64-1": (struct.pack("<Q", 2**64 - 1) + b"{}", "header length 18446744073709551615 exceeds"),
    "header-len-past-eof": (struct.pack("<Q", 100) + b"{}", "header length 100 exceeds the 2 bytes"),
    "not-json": (st_bytes(None, raw=b"{not json"), "not valid JSON"),
    "not-utf8": (st_bytes(None, raw=b'{"\xff": 1}'), "not valid JSON"),
    "json-list": (st_bytes([1, 2]), "is a JSON list, expected an object"),
    "duplicate-name": (st_bytes(None, bytes(8), raw=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
                                                   b' "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'),
                       "duplicate key 'a'"),
    "metadata-not-str": (st_bytes({"__metadata__": {"n": 1}, **OK}, bytes(12)), "__metadata__ must map strings"),
    "entry-not-object": (st_bytes({"a": [1]}), "entry is not a JSON object"),
    "unknown-dtype": (st_bytes({"a": entry("F128", [1], 0, 16)}, bytes(16)), "unknown dtype 'F128'"),
    "negative-dim": (st_bytes({"a": entry("F32", [-1], 0, 0)}), "not a list of non-negative integers"),
    "bool-dim": (st_bytes({"a": entry("F32", [True], 0, 4)}, bytes(4)), "not a list of non-negative integers"),
    "offsets-not-pair": (st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, bytes(4)),
                         "is not [begin, end]"),
    "begin-after-end": (st_bytes({"a": entry("F32", [1], 8, 4)}, bytes(8)), "begin > end"),
    "offsets-past-eof": (st_bytes({"a": entry("F32", [4], 0, 16)}, bytes(8)), "'a' data past end of file"),
    "huge-offsets": (st_bytes({"a": entry("F32", [2**62], 0, 2**64)}, bytes(8)), "data past end of file"),
    "size-mismatch": (st_bytes({"a": entry("F32", [3], 0, 8)}, bytes(8)), "needs 12 bytes, data_offsets span 8"),
    "overlap": (st_bytes({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)),
                "'b' bytes [4, 12) overlap tensor 'a'"),
    "gap": (st_bytes({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)),
            "unreferenced bytes [4, 8)"),
    "trailing-data": (st_bytes(OK, bytes(20)), "data section has 20 bytes but the tensors cover 12"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_crafted_bad_file(tmp_path, case):
    data, expected = BAD[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelFilesError) as e:
            check_safetensors(path)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert expected in msg
    assert elapsed < 1.0 and peak < 200 * 2**20


def test_crafted_ok_and_header_limit(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(st_bytes({"__metadata__": {"format": "pt"}, **OK}, bytes(12)))
    assert check_safetensors(path) == {"a": ("F32", (2,), (0, 8)), "b": ("U8", (4,), (8, 12))}
    with pytest.raises(ModelFilesError, match="more than the 16-byte limit"):
        check_safetensors(path, max_header=16)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFilesError, match="absent.safetensors: cannot read"):
        check_safetensors(tmp_path / "absent.safetensors")
