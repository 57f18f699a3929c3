"""Read a SentencePiece `tokenizer.model` (a protobuf `ModelProto`) without the sentencepiece package:
the pieces with their scores and types, the model type and whether a space is prepended to the text.
The original LLaVA checkpoints (liuhaotian/llava-v1.5-*, llava-v1.6-*: Vicuna, Mistral, Yi) ship only
this file; convert/tokenizer_gguf.py writes what it returns as llama.cpp's "llama" (SPM) vocabulary.

    spm = read_sentencepiece_model("llava-v1.6-mistral-7b/tokenizer.model")
    spm.pieces[1]      # (b"<s>", 0.0, 3): text, score, type (gguf.TokenType numbering: 3 = CONTROL)

The wire format is protobuf's (varints, length-delimited fields, fixed32 floats); only these fields of
sentencepiece_model.proto are read:
    ModelProto      1: repeated SentencePiece pieces   2: TrainerSpec   3: NormalizerSpec
    SentencePiece   1: string piece   2: float score   3: Type (NORMAL 1, UNKNOWN 2, CONTROL 3,
                    USER_DEFINED 4, UNUSED 5, BYTE 6: the numbering of gguf.TokenType)
    TrainerSpec     3: ModelType (UNIGRAM 1, the default; BPE 2; WORD 3; CHAR 4)
    NormalizerSpec  3: bool add_dummy_prefix (default true)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llava_local.errors import ConversionError

UNIGRAM, BPE = 1, 2
PIECE_TYPES = range(1, 7)   # NORMAL .. BYTE
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


@dataclass
class SentencePieceModel:
    pieces: list[tuple[bytes, float, int]]   # (text, score, type) in id order
    model_type: int                          # UNIGRAM or BPE (llama.cpp's "llama" vocabulary is BPE)
    add_dummy_prefix: bool                   # a "▁" is prepended to the text (Llama, Mistral; Yi: no)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one message: an int for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, i = _varint(buf, i)
        elif wire == _BYTES:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
            if len(value) != n:
                raise ValueError("truncated field")
        elif wire in (_FIXED32, _FIXED64):
            n = 4 if wire == _FIXED32 else 8
            value, i = buf[i:i + n], i + n
            if len(value) != n:
                raise ValueError("truncated field")
        else:
            raise ValueError(f"wire type {wire} of field {number} unsupported")
        yield number, wire, value


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    path = Path(path)
    try:
        buf = path.read_bytes()
        pieces, model_type, add_dummy_prefix = [], UNIGRAM, True
        for number, wire, value in _fields(buf):
            if number == 1 and wire == _BYTES:
                text, score, kind = b"", 0.0, 1
                for n, w, v in _fields(value):
                    if n == 1 and w == _BYTES:
                        text = v
                    elif n == 2 and w == _FIXED32:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == _VARINT:
                        kind = v
                if kind not in PIECE_TYPES:
                    raise ValueError(f"piece {len(pieces)} has type {kind}")
                pieces.append((text, score, kind))
            elif number == 2 and wire == _BYTES:
                model_type = next((v for n, w, v in _fields(value) if n == 3 and w == _VARINT), UNIGRAM)
            elif number == 3 and wire == _BYTES:
                add_dummy_prefix = bool(next((v for n, w, v in _fields(value) if n == 3 and w == _VARINT), 1))
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc})") from None
    except ValueError as exc:
        raise ConversionError(f"{path}: not a SentencePiece model ({exc})") from None
    if not pieces:
        raise ConversionError(f"{path}: not a SentencePiece model (no pieces)")
    return SentencePieceModel(pieces, model_type, add_dummy_prefix)
