"""Convert a LLaVA checkpoint into llama.cpp files: `<name>-llm-<TYPE>.gguf`, `<name>-mmproj-<TYPE>.gguf`
and `<name>.manifest.json`.

    from convert import convert
    result = convert("checkpoints/llava-1.5-7b-hf", "out/", outtype="f16")

CLI: `llava-local convert CHECKPOINT_DIR -o OUT_DIR [--outtype f32|f16|bf16] [--vision-tower DIR]
[--quantize Q4_K_M [--no-keep-unquantized]]`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llava_local.errors import ConversionError
from llava_local.formats.manifest import manifest_path as _manifest_path
from llava_local.formats.manifest import write_manifest
from llava_local.prompts.templates import get_template

from .checkpoint import LlavaCheckpoint, read_checkpoint
from .template_choice import resolve_template
from .writers import OUTTYPES, write_llm, write_mmproj

log = logging.getLogger(__name__)



@dataclass
class ConvertResult:
    llm_path: Path
    mmproj_path: Path
    manifest_path: Path
    manifest: dict


def output_paths(out_dir: Path, name: str, outtype: str) -> tuple[Path, Path, Path]:
    t = outtype.upper()
    return (out_dir / f"{name}-llm-{t}.gguf", out_dir / f"{name}-mmproj-{t}.gguf", _manifest_path(out_dir, name))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("llava-local", "gguf", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def convert(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *, outtype: str = "f16",
            vision_tower: str | os.PathLike | None = None, name: str | None = None,
            template: str | None = None, tokenizer_pre: str | None = None,
            progress=None, onnx: bool = False, quantize: str | None = None,
            keep_unquantized: bool = True) -> ConvertResult:
    """Convert one checkpoint (either layout) into an LLM GGUF, an mmproj GGUF and a manifest.
    With `quantize` (a type of convert/quantize.py) the LLM is then quantized and the manifest names
    the quantized file; the `outtype` LLM stays next to it unless `keep_unquantized` is False."""
    if outtype not in OUTTYPES:
        raise ConversionError(f"outtype {outtype!r} unknown (choose from {', '.join(OUTTYPES)})")
    if quantize is not None:
        from .quantize import QTYPES
        from .quantize import quantize as quantize_llm
        quantize = quantize.upper()
        if quantize not in QTYPES:
            raise ConversionError(f"quantization type {quantize!r} unknown (choose from {', '.join(QTYPES)})")
        if quantize == outtype.upper():
            raise ConversionError(f"--quantize {quantize} is the --outtype already")
    if name is not None and (not name or Path(name).name != name or name in (".", "..")):
        raise ConversionError(f"--name {name!r} must be a plain file name (no directories)")
    if template is not None:
        get_template(template)      # an unknown name fails before any work
    t0 = time.perf_counter()
    ck: LlavaCheckpoint = read_checkpoint(Path(src_dir), vision_tower=Path(vision_tower) if vision_tower else None,
                                          name=name)
    tmpl = get_template(resolve_template(ck, template))   # None: chosen from the checkpoint (template_choice.py)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    llm_path, mmproj_path, manifest_path = output_paths(dst, ck.name, outtype)
    log.info("converting %s (%s layout) -> %s", ck.source, ck.layout, dst)
    mm = write_mmproj(ck, mmproj_path, outtype, progress=progress)
    n_embd = int(ck.text["hidden_size"])
    if mm["projection_dim"] != n_embd:
        mmproj_path.unlink(missing_ok=True)
        raise ConversionError(f"projector width {mm['projection_dim']} != LLM embedding width {n_embd}")
    try:
        llm = write_llm(ck, llm_path, outtype, chat_template=tmpl.jinja, template_name=tmpl.name,
                        tokenizer_pre=tokenizer_pre, progress=progress)
    except BaseException:
        mmproj_path.unlink(missing_ok=True)
        raise
    unquantized_path = None
    if quantize is not None:
        unquantized_path, llm_path = llm_path, output_paths(dst, ck.name, quantize)[0]
        try:
            quantize_llm(unquantized_path, llm_path, quantize)
        except BaseException:
            unquantized_path.unlink(missing_ok=True)
            mmproj_path.unlink(missing_ok=True)
            raise
        if not keep_unquantized:
            unquantized_path.unlink()
            unquantized_path = None
    onnx_entry = None
    if onnx:  # the exact vision encoder for onnxruntime (convert/onnx_export.py)
        from .onnx_export import export_onnx, onnx_files
        try:
            files = onnx_files(dst, ck.name)
            export_onnx(ck, dst, name=ck.name)
        except BaseException:
            llm_path.unlink(missing_ok=True)
            mmproj_path.unlink(missing_ok=True)
            raise
        onnx_entry = {"model": files.model.name, "sidecar": files.sidecar.name, "data": files.data.name}
    manifest = {
        "name": ck.name, "llm": llm_path.name, "mmproj": mmproj_path.name, "outtype": outtype,
        "template": tmpl.name, "image_tokens": mm["image_tokens"], "n_embd": n_embd,
        "vision": asdict(ck.vision),
        "tokenizer": llm["tokenizer"],
        "source": {"path": str(ck.source.resolve()), "layout": ck.layout},
        "versions": _versions(),
    }
    if ck.anyres is not None:   # LLaVA-1.6: "image_tokens" above is per tile
        manifest["anyres"] = ck.anyres.to_json()
    if quantize is not None:
        manifest["quantize"] = quantize          # the LLM's type; "outtype" is the mmproj's
        if unquantized_path is not None:
            manifest["llm_unquantized"] = unquantized_path.name
    if onnx_entry:
        manifest["onnx"] = onnx_entry
    write_manifest(manifest_path, manifest)
    log.info("converted in %.1fs", time.perf_counter() - t0)
    return ConvertResult(llm_path, mmproj_path, manifest_path, manifest)
