"""Rewrite the chat template of a converted LLM GGUF: every other byte of the file is kept (the other
metadata in order, the tensor infos, the tensor data); only `tokenizer.chat_template` gets the current
Jinja of the named template (the one the file records in `llava_local.chat_template_name`, else
vicuna_v1).

    python -m convert.retemplate llava_local/data/demo/shapes-demo-llm-Q8_0.gguf   # `make retemplate-demo`
    python -m convert.retemplate out/model-llm-F16.gguf -o out/model-llm-F16-new.gguf

    from convert.retemplate import retemplate
    retemplate("out/model-llm-Q4_K_M.gguf")        # True if the file changed

Why: files converted before templates.py's VICUNA_V1_JINJA carried llama.cpp's Vicuna detection
substrings make upstream `llama-mtmd-cli` abort without `--jinja`; this updates them without a new
conversion (which needs the checkpoint) or a new quantization. A fresh conversion writes the current
template by itself (convert/__init__.py), and quantization copies it.

The file is spliced, not re-encoded: tensor offsets in a GGUF count from the start of the data
section, so only the template's key/value record and the padding before the (aligned) data section
change. That keeps quantized blocks and every other value bit-exact and costs one streaming copy, also
for a 7B file with a 32k-token vocabulary. The output goes to a temporary file renamed into place when
complete (llava_local/fileio.py `atomic_path`).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import struct
import sys
from pathlib import Path

import gguf

from llava_local.errors import ConversionError, LlavaLocalError
from llava_local.fileio import atomic_path
from llava_local.formats import gguf_names as names
from llava_local.formats.gguf_check import read_gguf_info
from llava_local.logs import setup_logging
from llava_local.prompts.templates import DEFAULT_TEMPLATE, get_template

log = logging.getLogger(__name__)

CHAT_TEMPLATE = gguf.Keys.Tokenizer.CHAT_TEMPLATE      # "tokenizer.chat_template"
KV_COUNT = "GGUF.kv_count"                            # the reader's name for the header's n_kv


def _field_value(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    return f.contents() if f is not None else None


def _end(field) -> int:
    return field.offset + sum(int(p.nbytes) for p in field.parts)


def _string_kv(key: str, value: str) -> bytes:
    """One GGUF key/value record of type STRING, little-endian: (u64 len, key) u32 type (u64 len, value)."""
    k, v = key.encode(), value.encode()
    return (struct.pack("<Q", len(k)) + k + struct.pack("<I", int(gguf.GGUFValueType.STRING))
            + struct.pack("<Q", len(v)) + v)


def retemplate(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
               template: str | None = None) -> bool:
    """Write `src` with the current Jinja of `template` (default: the one `src` names) to `dst`
    (default: `src`, replaced). Returns False, writing nothing, when `dst` is `src` and it already
    has that template."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    read_gguf_info(src)          # hostile or truncated headers: a clear error before gguf-py maps the file
    reader = gguf.GGUFReader(src)
    arch = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch == "clip":
        raise ConversionError(f"{src}: an mmproj (clip) file has no chat template; pass the LLM GGUF")
    if arch is None:
        raise ConversionError(f"{src}: no general.architecture: not a llama.cpp model file")
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ConversionError(f"{src}: a big-endian GGUF; only little-endian files are rewritten")
    name = template or _field_value(reader, names.KEY_LLAVA_LOCAL_TEMPLATE) or DEFAULT_TEMPLATE
    new = get_template(name).jinja
    old_field = reader.get_field(CHAT_TEMPLATE)
    if old_field is not None and old_field.types != [gguf.GGUFValueType.STRING]:
        raise ConversionError(f"{src}: {CHAT_TEMPLATE} is not a string")
    if old_field is not None and old_field.contents() == new and dst.resolve() == src.resolve():
        log.info("%s already has the current %s template", src, name)
        return False

    kv_fields = [f for k, f in reader.fields.items() if not k.startswith("GGUF.")]
    kv_end = max(_end(f) for f in kv_fields)
    ti_end = max((_end(t.field) for t in reader.tensors), default=kv_end)
    record = _string_kv(CHAT_TEMPLATE, new)
    if old_field is not None:
        cut_start, cut_end = old_field.offset, _end(old_field)
    else:       # appended as the last record; the header's n_kv grows by one
        cut_start = cut_end = kv_end
    shift = len(record) - (cut_end - cut_start)
    new_data_offset = -(-(ti_end + shift) // reader.alignment) * reader.alignment

    n_kv = reader.fields[KV_COUNT]
    n_kv_offset, n_kv_new = n_kv.offset, int(n_kv.parts[0][0]) + (old_field is None)
    data_offset = reader.data_offset
    del reader, old_field, n_kv, kv_fields   # views of the memory-mapped `src`, which may be replaced below
    with atomic_path(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        head = bytearray(fin.read(cut_start))
        struct.pack_into("<Q", head, n_kv_offset, n_kv_new)
        fout.write(head)
        fout.write(record)
        fin.seek(cut_end)
        fout.write(fin.read(ti_end - cut_end))                 # the other records, the tensor infos
        fout.write(b"\0" * (new_data_offset - (ti_end + shift)))
        fin.seek(data_offset)
        shutil.copyfileobj(fin, fout, 16 << 20)               # the tensor data, unchanged
    log.info("%s: chat template set to the current %s", dst, name)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.retemplate", description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", nargs="+", type=Path, help="LLM GGUF file(s), rewritten in place unless -o")
    ap.add_argument("-o", "--output", type=Path, help="write here instead (one input only)")
    ap.add_argument("--template", help="named template (default: the one the file names, else vicuna_v1)")
    a = ap.parse_args(argv)
    if a.output and len(a.gguf) != 1:
        ap.error("-o takes one input file")
    setup_logging(True, fmt="%(message)s")
    try:
        for path in a.gguf:
            changed = retemplate(path, a.output, template=a.template)
            print(f"{a.output or path}: {'template updated' if changed else 'already current'}")
    except LlavaLocalError as exc:   # ConversionError, ModelFilesError (missing, truncated, not a GGUF)
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
