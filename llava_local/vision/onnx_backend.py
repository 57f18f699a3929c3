"""`onnx` vision backend: the exported CLIP + projector graph on onnxruntime (CPU, CUDA or CoreML).

Exact (LLaVA's layer -2, CLS dropped, erf GELU; equal to the PyTorch reference within 1e-4, see
tests/test_onnx.py) and portable. Make the files with `llava-local convert CKPT -o OUT --onnx`; then

    llava-local run --model OUT/ --vision-backend onnx -p "What is this?" photo.jpg
    backend = create_backend("onnx", pair.mmproj)                  # finds OUT/<name>-vision.onnx
    backend = create_backend("onnx", pair.mmproj, VisionOptions(onnx_path="x-vision.onnx", device="gpu"))

The model is found from the manifest next to the mmproj (its "onnx" entry), else as
`<prefix>-vision.onnx` for an mmproj named `<prefix>-mmproj-<TYPE>.gguf`, else as `<stem>-vision.onnx`
(what `llava-local convert mmproj-model-f16.gguf -o . --onnx` writes for a downloaded pair). Its JSON
sidecar must agree with the mmproj (tokens, width, image size, normalisation), and every external-data location
in the graph must stay inside the model's folder (CVE-2024-27318): both are checked before
onnxruntime sees the file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from llava_local.errors import BackendUnavailableError, ModelFilesError
from llava_local.formats.manifest import manifest_for
from llava_local.image.preprocess import preprocess_batch
from llava_local.vision.base import PixelBackend, VisionOptions, register_backend

log = logging.getLogger(__name__)

# --- the file contract shared with the exporter (convert/onnx_export.py) ---
SIDECAR_FORMAT = "llava-local-onnx-vision"
SIDECAR_VERSION = 1
INPUT_NAME = "pixel_values"     # (B, 3, S, S) float32, normalised as in preprocess.py
OUTPUT_NAME = "image_embeds"    # (B, n_tokens, n_embd) float32
MANIFEST_KEY = "onnx"           # manifest["onnx"] = {"model": ..., "sidecar": ..., "data": ...}

# onnxruntime execution providers for --vision-device gpu, in order of preference. CPU is always last.
# CoreML only on request: it may run in float16 on the GPU / Neural Engine, so it is not exact.
GPU_PROVIDERS = ("CUDAExecutionProvider", "CoreMLExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


def model_name(prefix: str) -> str:
    return f"{prefix}-vision.onnx"


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """`x-vision.onnx` -> `x-vision.json`."""
    return Path(model_path).with_suffix(".json")


# --- finding the model ---
def _inside(folder: Path, name: str, where: Path) -> Path:
    p = folder / name
    if PurePosixPath(name).name != name or p.resolve().parent != folder.resolve():
        raise ModelFilesError(f"{where}: ONNX file {name!r} is outside the model directory")
    return p


def find_onnx_model(mmproj_path: Path) -> Path:
    """The ONNX model that belongs to this mmproj; BackendUnavailableError when there is none."""
    folder = mmproj_path.parent
    found = manifest_for(folder, mmproj=mmproj_path.name)
    entry = found[1].get(MANIFEST_KEY) if found else None
    if isinstance(entry, dict) and isinstance(entry.get("model"), str):
        p = _inside(folder, entry["model"], found[0])
        if not p.is_file():
            raise BackendUnavailableError(f"{found[0]} names ONNX model {p.name}, which is missing")
        return p
    prefix, sep, _ = mmproj_path.name.rpartition("-mmproj-")
    if sep and (folder / model_name(prefix)).is_file():
        return folder / model_name(prefix)
    # what `llava-local convert MMPROJ.gguf --onnx` names it for other mmproj names (mmproj-model-f16.gguf)
    if (folder / model_name(mmproj_path.stem)).is_file():
        return folder / model_name(mmproj_path.stem)
    raise BackendUnavailableError(f"no ONNX vision model next to {mmproj_path.name} "
                                  "(make one with `llava-local convert --onnx`)")


# --- checking it ---
def _graph_tensors(graph) -> Iterator:
    """Every TensorProto of a graph that may carry external data, subgraphs included."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator:
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("sparse_tensor"):
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        if a.HasField("g"):
            yield from _graph_tensors(a.g)
        for g in a.graphs:
            yield from _graph_tensors(g)


def _model_tensors(model) -> Iterator:
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield from _node_tensors(node)


def check_external_data(model_path: Path, model) -> None:
    """Refuse any external-data location that is absolute, climbs out with "..", or resolves
    (through symlinks) outside the model's folder; and data that is missing or out of range."""
    folder = model_path.parent.resolve()
    sizes: dict[Path, int] = {}
    for t in _model_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        if t.data_location != t.EXTERNAL and not info:
            continue
        loc = info.get("location", "")
        posix, win = PurePosixPath(loc), PureWindowsPath(loc)
        bad = (not loc or posix.is_absolute() or win.is_absolute() or win.drive or loc.startswith(("/", "\\"))
               or ".." in posix.parts or ".." in win.parts)
        target = (folder / loc).resolve() if not bad else None
        if bad or not target.is_relative_to(folder):
            raise ModelFilesError(f"{model_path}: tensor {t.name!r} keeps its data at {loc!r}, outside the model's "
                                  "folder: refused (ONNX external data must sit next to the model)")
        if target not in sizes:
            if not target.is_file():
                raise ModelFilesError(f"{model_path}: external data file {loc!r} (tensor {t.name!r}) is missing")
            sizes[target] = target.stat().st_size
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", sizes[target]))
        except ValueError:
            raise ModelFilesError(f"{model_path}: tensor {t.name!r} has a malformed external-data offset/length") from None
        if offset < 0 or length < 0 or offset + length > sizes[target]:
            raise ModelFilesError(f"{model_path}: tensor {t.name!r} data [{offset}, {offset + length}) lies past the "
                                  f"end of {loc!r} ({sizes[target]} bytes): truncated file?")


def _check_io(model_path: Path, model, image_size: int) -> None:
    ins = {i.name: i for i in model.graph.input}
    outs = {o.name for o in model.graph.output}
    if INPUT_NAME not in ins or OUTPUT_NAME not in outs:
        raise ModelFilesError(f"{model_path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found "
                              f"inputs {sorted(ins)} and outputs {sorted(outs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in ins[INPUT_NAME].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1:] not in ([3, image_size, image_size], [None, None, None]):
        raise ModelFilesError(f"{model_path}: input {INPUT_NAME} has shape {dims}, expected [batch, 3, "
                              f"{image_size}, {image_size}]")


def read_sidecar(path: Path, mmproj) -> dict:
    """The sidecar, checked against the mmproj the LLM was paired with."""
    try:
        sc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFilesError(f"{path}: ONNX sidecar missing (re-export with `llava-local convert --onnx`)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{path}: unreadable ONNX sidecar ({exc})") from None
    if not isinstance(sc, dict) or sc.get("format") != SIDECAR_FORMAT:
        raise ModelFilesError(f"{path}: not a llava-local ONNX sidecar (format {sc.get('format') if isinstance(sc, dict) else None!r})")
    if not isinstance(sc.get("version"), int) or sc["version"] > SIDECAR_VERSION:
        raise ModelFilesError(f"{path}: sidecar version {sc.get('version')!r} is newer than this llava-local reads")
    expect = {"n_embd": mmproj.projection_dim, "n_tokens": mmproj.image_tokens, "image_size": mmproj.image_size,
              "feature_layer": mmproj.feature_layer}
    for key, want in expect.items():
        if sc.get(key) != want:
            raise ModelFilesError(f"{path}: ONNX model has {key} {sc.get(key)!r} but the mmproj "
                                  f"{mmproj.path.name} has {want}: the ONNX file belongs to another model")
    for key, want in (("image_mean", mmproj.image_mean), ("image_std", mmproj.image_std)):
        got = sc.get(key)
        if not (isinstance(got, list) and len(got) == len(want)
                and all(isinstance(g, (int, float)) and math.isclose(g, w, rel_tol=1e-6) for g, w in zip(got, want))):
            raise ModelFilesError(f"{path}: {key} {got!r} differs from the mmproj's {list(want)}")
    anyres = sc.get("anyres")   # LLaVA-1.6: the exporter records the pinpoints (height, width) it was made for
    want_pinpoints = [list(p) for p in mmproj.anyres.grid_pinpoints] if mmproj.anyres is not None else None
    if anyres is not None and (not isinstance(anyres, dict) or anyres.get("grid_pinpoints") != want_pinpoints):
        got = anyres.get("grid_pinpoints") if isinstance(anyres, dict) else anyres
        raise ModelFilesError(f"{path}: ONNX model's grid pinpoints {got!r} differ from the mmproj "
                              f"{mmproj.path.name}'s {want_pinpoints!r}: the ONNX file belongs to another model")
    if sc.get("resample", "bicubic") != "bicubic":
        raise ModelFilesError(f"{path}: resample {sc.get('resample')!r} unsupported (LLaVA-1.5: bicubic)")
    return sc


def choose_providers(device: str, available: Sequence[str], platform: str = sys.platform) -> list[str]:
    """GPU providers only for device "gpu" (CoreML only on macOS), CPU always as the fallback."""
    chosen = []
    if device == "gpu":
        for p in GPU_PROVIDERS:
            if p in available and (p != "CoreMLExecutionProvider" or platform == "darwin"):
                chosen.append(p)
                break
        else:
            log.warning("vision device gpu requested, but onnxruntime offers only %s: using CPU "
                        "(install onnxruntime-gpu for CUDA)", ", ".join(available))
    return chosen + [CPU_PROVIDER]


@register_backend("onnx")
class OnnxBackend(PixelBackend):
    exact = True

    def __init__(self, mmproj, options: VisionOptions, llm=None):
        del llm  # onnxruntime runs the exported graph on its own
        super().__init__(mmproj, options)
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(f"the onnx vision backend needs onnx and onnxruntime ({exc})") from None
        path = Path(options.onnx_path) if options.onnx_path is not None else find_onnx_model(Path(mmproj.path))
        if not path.is_file():
            raise BackendUnavailableError(f"{path}: ONNX vision model not found")
        sc = read_sidecar(sidecar_path(path), mmproj)
        self.preprocess_config = replace(self.preprocess_config, pad_to_square=bool(sc.get("pad_to_square", True)))
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:   # protobuf DecodeError, OSError, onnx's own errors: all mean "bad file"
            raise ModelFilesError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
        check_external_data(path, proto)          # before onnxruntime opens anything the graph names
        _check_io(path, proto, mmproj.image_size)
        del proto
        chosen = (list(options.providers) if options.providers
                  else choose_providers(options.device, ort.get_available_providers()))
        opts = ort.SessionOptions()
        if options.threads:
            opts.intra_op_num_threads = options.threads
        opts.log_severity_level = 3   # onnxruntime's warnings go to stderr otherwise
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as exc:   # onnxruntime raises its own pybind exception types
            raise ModelFilesError(f"{path}: onnxruntime could not load it ({exc})") from None
        self.path = path
        self.batch_size = max(1, int(options.batch_size))
        log.info("onnx vision backend: %s on %s", path.name, ", ".join(self.session.get_providers()))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) normalised pixels -> (B, n_tokens, n_embd), in batches of `batch_size`."""
        out = []
        for i in range(0, len(pixels), self.batch_size):
            x = np.ascontiguousarray(pixels[i:i + self.batch_size], dtype=np.float32)
            y = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]   # (b, n_tokens, n_embd)
            if y.shape != (len(x), self.n_tokens, self.n_embd):
                raise ModelFilesError(f"{self.path}: produced shape {y.shape}, expected "
                                      f"{(len(x), self.n_tokens, self.n_embd)}")
            out.append(y)
        return np.concatenate(out).astype(np.float32, copy=False)

    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.n_tokens, self.n_embd), np.float32)
        out = []
        for i in range(0, len(images), self.batch_size):   # preprocess chunk by chunk: bounded memory
            out.append(self.encode_pixels(preprocess_batch(images[i:i + self.batch_size], self.preprocess_config)))
        return np.concatenate(out)

    def close(self) -> None:
        self.session = None
