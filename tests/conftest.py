"""Shared fixtures: a tiny random LLaVA (real architecture) saved in both checkpoint layouts and
converted once per session. Nothing is downloaded."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# test modules import the helpers beside them (conftest, train_helpers) by name
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train.tiny_models import TinySpec, build_tiny_llava, save_original_layout  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(model, hf_dir, original_dir, clip_dir) of one tiny random LLaVA."""
    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny_llava(root / "tiny-hf")
    save_original_layout(model, root / "tiny-orig", root / "tiny-clip")
    return model, root / "tiny-hf", root / "tiny-orig", root / "tiny-clip"


@pytest.fixture(scope="session")
def tiny_next_ckpt(tmp_path_factory):
    """(model, hf_dir, original_dir, clip_dir) of one tiny random LLaVA-1.6 (anyres, 56-px tiles)."""
    from train.tiny_models import build_tiny_llava_next, save_original_next_layout
    root = tmp_path_factory.mktemp("tiny-next")
    model, hf_dir = build_tiny_llava_next(root / "next-hf")
    save_original_next_layout(model, root / "next-orig", root / "next-clip")
    return model, hf_dir, root / "next-orig", root / "next-clip"


@pytest.fixture(scope="session")
def converted_next_f32(tiny_next_ckpt, tmp_path_factory):
    """The LLaVA-1.6 llava-hf layout converted to F32 (ConvertResult)."""
    from convert import convert
    out = tmp_path_factory.mktemp("conv-next-f32")
    return convert(tiny_next_ckpt[1], out, outtype="f32")


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    return tiny_ckpt[0]


@pytest.fixture(scope="session")
def converted_f32(tiny_ckpt, tmp_path_factory):
    """The llava-hf layout converted to F32 (through the library; the CLI is tested in test_convert)."""
    from convert import convert
    out = tmp_path_factory.mktemp("conv-hf-f32")
    return convert(tiny_ckpt[1], out, outtype="f32")


@pytest.fixture(scope="session")
def pair_f32(converted_f32):
    from llava_local.runtime.model_pair import resolve_pair
    return resolve_pair(converted_f32.llm_path.parent)


@pytest.fixture(scope="session")
def other_width_pair(tmp_path_factory):
    """A second tiny model whose LLM is wider (96): its mmproj must not pair with the first LLM."""
    from convert import convert
    root = tmp_path_factory.mktemp("wide")
    build_tiny_llava(root / "wide-hf", TinySpec(text_hidden=96, text_heads=4, text_kv_heads=4, seed=1))
    return convert(root / "wide-hf", root / "out", outtype="f32")


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture()
def sample_png(tmp_path) -> Path:
    p = tmp_path / "sample.png"
    random_image(80, 60, seed=3).save(p)
    return p


IMAGES = [random_image(80, 60, 1), random_image(40, 90, 2), random_image(56, 56, 3), random_image(200, 30, 4)]


def reference_image_features(model, pixels: np.ndarray) -> np.ndarray:
    """transformers' LLaVA vision path (get_image_features) on preprocessed pixels: (B, n_tokens, n_embd)."""
    import torch
    with torch.no_grad():
        f = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    f = getattr(f, "pooler_output", f)
    if isinstance(f, (list, tuple)):
        f = torch.stack(list(f))
    return f.reshape(pixels.shape[0], -1, f.shape[-1]).numpy()


def assert_one_line_error(res, *needles) -> str:
    """A CLI failure as RELIABILITY.md wants it: exit 1, one `Error: ...` line, no traceback."""
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def cosine_per_token(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_embeddings_close(a: np.ndarray, b: np.ndarray, *, max_abs: float) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    d = float(np.abs(a - b).max())
    assert d <= max_abs, f"max |Δ| {d:.3g} > {max_abs}"
    return d


def rewrite_mmproj(src: Path, dst: Path, *, override: dict | None = None, drop_tensor: str | None = None,
                   rename: dict | None = None) -> Path:
    """A copy of an mmproj with metadata changed (`override`; keys it does not have are added as strings
    or int32 arrays), a tensor left out or tensors renamed (gguf-py)."""
    import gguf
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "clip")
    override = dict(override or {})
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, override.pop(field.name, field.contents()), vtype, sub_type=sub)
    for key, value in override.items():   # new keys
        w.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.ARRAY,
                        sub_type=None if isinstance(value, str) else gguf.GGUFValueType.INT32)
    for t in reader.tensors:
        if t.name != drop_tensor:
            w.add_tensor((rename or {}).get(t.name, t.name), np.array(t.data), raw_shape=tuple(int(x) for x in reversed(t.shape.tolist())),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
