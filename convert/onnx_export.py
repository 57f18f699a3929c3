"""Export LLaVA's vision side (CLIP vision tower + projector) to ONNX, for onnxruntime.

    from convert.onnx_export import export_onnx
    model = export_onnx("checkpoints/llava-1.5-7b-hf", "out/", name="llava-1.5-7b")
    # out/llava-1.5-7b-vision.onnx        the graph (opset 17, float32, dynamic batch)
    # out/llava-1.5-7b-vision.onnx.data   its weights (ONNX external data, next to the graph)
    # out/llava-1.5-7b-vision.json        the sidecar: the preprocessing the graph expects

CLI: `llava-local convert CHECKPOINT -o OUT --onnx` (with the GGUF pair and the manifest).

From an mmproj GGUF alone (a downloaded pair, ours or upstream's legacy `mmproj-model-f16.gguf`):

    from convert.onnx_export import export_onnx_from_mmproj
    model = export_onnx_from_mmproj("models/mmproj-model-f16.gguf", "models/")
    # models/mmproj-model-f16-vision.onnx (+ .onnx.data, .json): next to the mmproj, where the
    # onnx backend looks for it

CLI: `llava-local convert MMPROJ.gguf -o OUT --onnx`. The encoder is the one the `torch` backend
builds from that file (llava_local/vision/torch_backend.py `build_modules`), so it is exactly as
exact as the file's weights: F16 weights are widened, not restored.

LLaVA-1.6 ("anyres"): the graph is the same per-tile encoder (base image and tiles are a batch of
S x S images); the sidecar's "anyres" entry carries the grid pinpoints, and the packing (unpadding,
the `image_newline` vector after each row) is the backend's, with the newline read from the mmproj.

The graph is LLaVA's exact vision path, unlike llama.cpp's clip graph (upstream #25814):
`pixel_values (B, 3, S, S) -> CLIP hidden_states[feature_layer] -> drop CLS -> Linear, GELU (erf),
Linear -> image_embeds (B, n_tokens, n_embd)`. Only the CLIP layers up to the feature layer are
built, so the graph's last layer output *is* hidden_states[feature_layer]. Weights stay float32
whatever the checkpoint's dtype, so the ONNX model matches the PyTorch reference to ~1e-6.

Every file is written under a temporary name inside the output folder and renamed into place only
when the whole export (and `onnx.checker`) succeeded; names that would land outside the output
folder are refused before anything is written.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_local.errors import ConversionError
from llava_local.fileio import atomic_path, write_json
# the file contract (names, sidecar format) lives with its reader, which must not import torch
from llava_local.vision.onnx_backend import (INPUT_NAME, OUTPUT_NAME, SIDECAR_FORMAT, SIDECAR_VERSION, model_name,
                                             sidecar_path)

from .checkpoint import LlavaCheckpoint, anyres_json, read_checkpoint

log = logging.getLogger(__name__)

MIN_OPSET = 17                  # LayerNormalization is an ONNX op from 17 on


@dataclass(frozen=True)
class OnnxFiles:
    model: Path     # <name>-vision.onnx
    data: Path      # <name>-vision.onnx.data (external weights; the graph names it relatively)
    sidecar: Path   # <name>-vision.json


def onnx_files(out_dir: str | os.PathLike, name: str) -> OnnxFiles:
    """The three output paths, refused unless each sits directly in `out_dir` (after symlinks)."""
    out = Path(out_dir)
    base = out.resolve()
    if not name:
        raise ConversionError("ONNX export name is empty")
    model = out / model_name(name)
    files = OnnxFiles(model, model.with_name(model.name + ".data"), sidecar_path(model))
    for p in (files.model, files.data, files.sidecar):
        if os.sep in name or (os.altsep and os.altsep in name) or p.resolve().parent != base:
            raise ConversionError(f"ONNX export name {name!r} would write {p} outside the output folder {out}")
    return files


class LlavaVisionEncoder(torch.nn.Module):
    """CLIP (truncated at LLaVA's feature layer) + the mlp2x_gelu projector, as one graph."""

    def __init__(self, clip, linear_1: torch.nn.Linear, linear_2: torch.nn.Linear):
        super().__init__()
        self.clip = clip
        self.linear_1 = linear_1
        self.linear_2 = linear_2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.clip.embeddings(pixel_values)                # (B, 1+N, D): CLS first, then patches
        h = self.clip.pre_layrnorm(h)                         # hidden_states[0]
        h = self.clip.encoder(inputs_embeds=h).last_hidden_state  # (B, 1+N, D) = hidden_states[feature_layer]
        h = h[:, 1:]                                          # (B, N, D): LLaVA "patch" features, CLS dropped
        h = torch.nn.functional.gelu(self.linear_1(h))        # (B, N, 4096): exact erf GELU
        return self.linear_2(h)                               # (B, N, n_embd)


def build_encoder(ck: LlavaCheckpoint) -> LlavaVisionEncoder:
    """The float32 PyTorch module that is exported, with the checkpoint's weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    v = ck.vision
    cfg = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.feature_layer,   # the layers after it never reach the LLM
                           num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                           layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
    cfg._attn_implementation = "eager"   # plain MatMul/Softmax: traces the same on every exporter and provider
    clip = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for rel, param in clip.state_dict().items():
            if rel.startswith("post_layernorm."):   # only feeds CLIP's pooled output, which LLaVA never uses
                continue
            src = ck.vision_prefix + rel
            if src not in ck.vision_store:
                raise ConversionError(f"{ck.source}: CLIP tensor {src!r} missing from the checkpoint")
            t = ck.vision_store.get(src)
            if tuple(t.shape) != tuple(param.shape):
                raise ConversionError(f"{ck.source}: {src} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
            param.copy_(t.to(torch.float32))
    linears = []
    for layer in ck.projector_layers:
        w = ck.store.get(f"{ck.projector_prefix}{layer}.weight").to(torch.float32)   # (out, in)
        b = ck.store.get(f"{ck.projector_prefix}{layer}.bias").to(torch.float32)
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        linears.append(lin)
    if linears[0].in_features != v.hidden_size or linears[1].in_features != linears[0].out_features:
        raise ConversionError(f"{ck.source}: projector shapes {tuple(linears[0].weight.shape)}, "
                              f"{tuple(linears[1].weight.shape)} do not chain from CLIP width {v.hidden_size}")
    return LlavaVisionEncoder(clip, *linears).eval()


def _sidecar(files: OnnxFiles, opset: int, *, image_size: int, patch_size: int, image_mean, image_std,
             n_tokens: int, n_embd: int, feature_layer: int, source: dict, anyres: dict | None = None) -> dict:
    sc = {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
        "model": files.model.name, "external_data": files.data.name, "opset": opset, "dtype": "float32",
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, image_size, image_size]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", n_tokens, n_embd]},
        # LLaVA-1.5 preprocessing (llava_local/image/preprocess.py): pad to square with the mean colour,
        # bicubic resize, x/255, (x - mean) / std, channels first
        "image_size": image_size, "patch_size": patch_size,
        "pad_to_square": True, "resample": "bicubic", "rescale_factor": 1 / 255,
        "image_mean": list(image_mean), "image_std": list(image_std),
        "n_tokens": n_tokens, "n_embd": n_embd, "feature_layer": feature_layer,
        "source": source,
    }
    if anyres is not None:   # LLaVA-1.6: n_tokens is per tile; an image is the base + its tiles
        sc["anyres"] = anyres
    return sc


def sidecar(ck: LlavaCheckpoint, files: OnnxFiles, n_embd: int, opset: int) -> dict:
    v = ck.vision
    return _sidecar(files, opset, image_size=v.image_size, patch_size=v.patch_size, image_mean=v.image_mean,
                    image_std=v.image_std, n_tokens=v.n_patches, n_embd=n_embd, feature_layer=v.feature_layer,
                    source={"name": ck.name, "layout": ck.layout},
                    anyres=ck.anyres.to_json() if ck.anyres is not None else None)


def _torch_export(module: torch.nn.Module, path: Path, image_size: int, opset: int) -> None:
    x = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")   # TracerWarnings about Python-side shape checks in transformers
        # dynamo=False: the TorchScript exporter needs no onnxscript and gives a plain opset-17 graph
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)


def export_onnx(checkpoint: str | os.PathLike | LlavaCheckpoint, out_dir: str | os.PathLike, *,
                name: str | None = None, opset: int = MIN_OPSET,
                vision_tower: str | os.PathLike | None = None) -> Path:
    """Export one checkpoint's vision side (either layout; `vision_tower` as in `convert`).

    Returns the `.onnx` path; its sidecar is `sidecar_path(it)`, its weights `it` + ".data".
    """
    _check_opset(opset)
    ck = checkpoint if isinstance(checkpoint, LlavaCheckpoint) else \
        read_checkpoint(Path(checkpoint), vision_tower=Path(vision_tower) if vision_tower else None)
    name = ck.name if name is None else name
    files = onnx_files(out_dir, name)      # refuse a bad name before anything is created
    module = build_encoder(ck)
    sc = sidecar(ck, files, module.linear_2.out_features, opset)
    return _write(module, files, sc, opset)


def default_mmproj_name(mmproj_path: Path) -> str:
    """`<prefix>-mmproj-<TYPE>.gguf` (ours) -> `<prefix>`, anything else (`mmproj-model-f16.gguf`) -> its stem:
    the two names the onnx backend looks for next to an mmproj."""
    prefix, sep, _ = mmproj_path.name.rpartition("-mmproj-")
    return prefix if sep and prefix else mmproj_path.stem


def export_onnx_from_mmproj(mmproj: str | os.PathLike, out_dir: str | os.PathLike, *,
                            name: str | None = None, opset: int = MIN_OPSET) -> Path:
    """Export the vision side stored in an mmproj GGUF (either FFN naming, any weight type the
    `torch` backend reads), with the same files and sidecar as `export_onnx`. Returns the `.onnx` path."""
    from llava_local.formats.mmproj import read_mmproj
    from llava_local.vision.torch_backend import build_modules
    _check_opset(opset)
    mm = read_mmproj(mmproj)               # ModelFilesError with the reason for a file it cannot run
    name = default_mmproj_name(mm.path) if name is None else name
    files = onnx_files(out_dir, name)
    module = LlavaVisionEncoder(*build_modules(mm, attn_implementation="eager")).eval()
    sc = _sidecar(files, opset, image_size=mm.image_size, patch_size=mm.patch_size, image_mean=mm.image_mean,
                  image_std=mm.image_std, n_tokens=mm.image_tokens, n_embd=mm.projection_dim,
                  feature_layer=mm.feature_layer,
                  source={"name": mm.path.name, "layout": "mmproj-legacy" if mm.ffn_swapped else "mmproj"},
                  anyres=anyres_json(mm.anyres.grid_pinpoints) if mm.anyres is not None else None)
    return _write(module, files, sc, opset)


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ConversionError(f"ONNX opset {opset} < {MIN_OPSET} (LayerNormalization needs 17)")


def _write(module: LlavaVisionEncoder, files: OnnxFiles, sc: dict, opset: int) -> Path:
    """Trace `module`, check the graph, and place graph, weights and sidecar `sc` atomically."""
    import onnx
    image_size, n_tokens = sc["image_size"], sc["n_tokens"]
    out = files.model.parent
    out.mkdir(parents=True, exist_ok=True)
    name = files.model.name
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".part", dir=out))
    placed: list[Path] = []
    try:
        raw = tmp / "traced.onnx"
        _torch_export(module, raw, image_size, opset)
        del module
        model = onnx.load(str(raw))        # with its external data, if torch wrote any (> 2 GB)
        # the tracer leaves the token axis symbolic (it comes from the CLS slice): state it
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = n_tokens
        staged = tmp / files.model.name
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=files.data.name, size_threshold=0)
        del model
        onnx.checker.check_model(str(staged), full_check=True)   # the path form also checks external data
        # data first, graph next, sidecar last: a reader never finds a graph without its weights
        for p in (files.data, files.model):
            with atomic_path(p) as target_tmp:      # synced, then renamed into place
                os.replace(tmp / p.name, target_tmp)
            placed.append(p)
        write_json(files.sidecar, sc)
    except BaseException as exc:
        for p in placed:   # a failure between renames (disk, signal): take back what went out
            p.unlink(missing_ok=True)
        if isinstance(exc, onnx.checker.ValidationError):
            raise ConversionError(f"{files.model}: exported ONNX failed onnx.checker: {exc}") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%.1fs)", files.model, time.perf_counter() - t0)
    return files.model
