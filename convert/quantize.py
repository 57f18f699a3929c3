"""Quantize llama.cpp files: the LLM GGUF with llama.cpp's own quantizer (`llama_model_quantize`,
the code behind `llama-quantize`), so the result is exactly what upstream tools produce; the mmproj
(CLIP + projector) GGUF in Python with gguf-py, to F16 or Q8_0.

    from convert.quantize import quantize, quantize_file
    quantize("out/model-llm-F32.gguf", "out/model-llm-Q8_0.gguf", "Q8_0")        # LLM only
    quantize_file("out/model-mmproj-F32.gguf", "out/model-mmproj-Q8_0.gguf", "Q8_0")  # either, by architecture

CLI: `llava-local quantize IN.gguf -o OUT.gguf --type Q4_K_M`.

Every output is written to a temporary file and renamed into place only when complete
(llava_local/fileio.py `atomic_path`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from llava_local.errors import ConversionError, ModelFilesError
from llava_local.fileio import atomic_path
from llava_local.formats import gguf_names as names

from .gguf_output import gguf_writer, write_data

log = logging.getLogger(__name__)

# type name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* constant name (looked up in llama_cpp at call time)
QTYPES = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


def quantize(src_gguf: str | os.PathLike, dst_gguf: str | os.PathLike, qtype: str, *,
             threads: int = 0) -> Path:
    """Quantize `src_gguf` (F32/F16/BF16 LLM GGUF) to `qtype`; returns the output path."""
    src, dst = Path(src_gguf), Path(dst_gguf)
    key = qtype.upper()
    if key not in QTYPES:
        raise ConversionError(f"quantization type {qtype!r} unknown (choose from {', '.join(QTYPES)})")
    if not src.is_file():
        raise ConversionError(f"{src}: no such GGUF file")
    if src.resolve() == dst.resolve():
        raise ConversionError(f"{src}: source and destination are the same file")
    from llava_local.formats.gguf_check import read_gguf_info
    arch = read_gguf_info(src).architecture
    if arch == "clip":
        raise ConversionError(f"{src}: an mmproj (clip) file; quantize_mmproj() quantizes those")
    from llava_local.llama_lib import llama_cpp_lib
    L = llama_cpp_lib()
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, QTYPES[key])
    params.nthread = threads
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            raise ConversionError(f"{src}: llama.cpp could not quantize it to {key} (code {rc}; "
                                  "run with --verbose for its log)")
    log.info("quantized %s -> %s (%s, %.1f MB)", src.name, dst.name, key, dst.stat().st_size / 1e6)
    return dst


# --- the mmproj: F16 or Q8_0, written by gguf-py ---

GT = gguf.GGMLQuantizationType
# type name -> (matrix type, general.file_type). No K-quants: the vision tower is a small part of a
# LLaVA's size (0.6 of 13.5 GB at 7B, F16), and Q8_0 already keeps its embeddings at cosine > 0.999.
MMPROJ_QTYPES = {
    "F16": (GT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (GT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Added to activations, not multiplied: kept F32 like norms and biases (as convert/writers.py writes them)
MMPROJ_KEEP_F32 = (names.CLIP_TENSORS["embeddings.position_embedding.weight"],
                   names.CLIP_TENSORS["embeddings.class_embedding"])
# A conv kernel: clip.cpp's patch embedding runs it through im2col, which takes F16/F32 only
MMPROJ_KEEP_F16 = (names.CLIP_TENSORS["embeddings.patch_embedding.weight"],)
# Keys the writer sets itself, or that describe the old file's layout and types
_MMPROJ_SKIP_KEYS = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.ALIGNMENT)


def mmproj_tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> GT:
    """The type a tensor of an mmproj gets at `qtype`; `shape` in ggml order (row length first)."""
    matrix, _ = MMPROJ_QTYPES[qtype]
    if name in MMPROJ_KEEP_F32 or len(shape) <= 1:
        return GT.F32
    if name in MMPROJ_KEEP_F16 or matrix == GT.F16:
        return GT.F16
    block = gguf.GGML_QUANT_SIZES[matrix][0]
    return matrix if len(shape) == 2 and shape[0] % block == 0 else GT.F16


def _nbytes(shape: tuple[int, ...], ttype: GT) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    return int(np.prod(shape)) // block * size


def _convert_tensor(t, ttype: GT) -> np.ndarray:
    """A reader tensor, dequantized to float32 in numpy (row-major) shape, then converted to `ttype`."""
    data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    data = data.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
    return gguf.quants.quantize(data, ttype)


def _converted_bytes(t, ttype: GT, nbytes: int) -> np.ndarray:
    """`_convert_tensor` as the raw bytes the writer's tensor info announced (`nbytes` of them)."""
    arr = _convert_tensor(t, ttype)
    assert arr.nbytes == nbytes, (t.name, arr.nbytes, nbytes)
    return np.ascontiguousarray(arr).view(np.uint8)


def quantize_mmproj(src_gguf: str | os.PathLike, dst_gguf: str | os.PathLike, qtype: str, *,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Requantize an mmproj GGUF (architecture "clip") to F16 or Q8_0: 2-D matrices whose rows are a
    multiple of 32 become Q8_0 (the rest F16), the patch embedding F16, 1-D tensors and the position
    and class embeddings F32. Metadata is copied; general.file_type is updated."""
    src, dst = Path(src_gguf), Path(dst_gguf)
    key = qtype.upper()
    if key not in MMPROJ_QTYPES:
        raise ConversionError(f"{src}: an mmproj is quantized to {' or '.join(MMPROJ_QTYPES)} only, "
                              f"not {qtype!r}")
    if not src.is_file():
        raise ConversionError(f"{src}: no such GGUF file")
    if src.resolve() == dst.resolve():
        raise ConversionError(f"{src}: source and destination are the same file")
    from llava_local.formats.gguf_check import read_gguf_info
    info = read_gguf_info(src)            # bounded preflight: a truncated or hostile file stops here
    if info.architecture != "clip":
        raise ConversionError(f"{src}: not an mmproj (general.architecture is {info.architecture!r}, "
                              "expected 'clip')")
    try:
        reader = gguf.GGUFReader(src)
    except (ValueError, OSError) as exc:
        raise ModelFilesError(f"{src}: gguf-py cannot read it ({exc})") from None
    plan = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in t.shape.tolist())
        ttype = mmproj_tensor_type(t.name, shape, key)
        plan.append((t, ttype, _nbytes(shape, ttype)))

    dst.parent.mkdir(parents=True, exist_ok=True)
    with gguf_writer(dst, "clip") as writer:
        for field in reader.fields.values():
            if field.name in _MMPROJ_SKIP_KEYS or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(MMPROJ_QTYPES[key][1])
        for t, ttype, nbytes in plan:
            # byte shape of the stored rows; add_tensor_info turns it back into the element shape
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            block, size = gguf.GGML_QUANT_SIZES[ttype]
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=ttype)
        write_data(writer, [(t.name, lambda t=t, ttype=ttype, nbytes=nbytes: _converted_bytes(t, ttype, nbytes))
                            for t, ttype, nbytes in plan], progress)
    log.info("quantized %s -> %s (%s, %.1f MB)", src.name, dst.name, key, dst.stat().st_size / 1e6)
    return dst


def quantize_file(src_gguf: str | os.PathLike, dst_gguf: str | os.PathLike, qtype: str, *,
                  threads: int = 0) -> Path:
    """Quantize an LLM or an mmproj GGUF, whichever `general.architecture` says it is."""
    src = Path(src_gguf)
    if not src.is_file():
        raise ConversionError(f"{src}: no such GGUF file")
    from llava_local.formats.gguf_check import read_gguf_info
    if read_gguf_info(src).architecture == "clip":
        return quantize_mmproj(src, dst_gguf, qtype)
    return quantize(src, dst_gguf, qtype, threads=threads)
