"""`llava-local convert` on LLaVA-1.6 ("anyres") checkpoints, and the LLaVA-1.6 mmproj files that
upstream's legacy converter makes.

- Both layouts (llava-hf `LlavaNextForConditionalGeneration`; liuhaotian/llava-v1.6 with its tuned
  CLIP inside the checkpoint) convert to the same tensors and keys: the grid pinpoints as
  (width, height) pairs for clip.cpp, `mm_patch_merge_type = spatial_unpad`, `v.image_newline`.
- Every setting we cannot run exactly is refused with one clear error naming the field.
- `write_legacy_next_mmproj` writes a 1.6 mmproj the way `llava_surgery_v2.py` +
  `convert_image_encoder_to_gguf.py --clip-model-is-vision` (upstream docs/multimodal/llava.md) do;
  our mmproj reader sees the same tiling in it as in our own file.

    .venv/bin/python -m pytest -q tests/test_convert_next.py
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error
from llava_local.cli.main import main
from llava_local.errors import ConversionError
from llava_local.formats import gguf_names as names
from llava_local.formats.gguf_check import read_gguf_info
from test_legacy_mmproj import write_legacy_mmproj

K = gguf.Keys
TINY_PINPOINTS_HW = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]   # TinyNextSpec, transformers' order
TINY_PINPOINTS_GGUF = [112, 56, 56, 112, 112, 112, 56, 168, 168, 56]           # (width, height) pairs
# keys that name the source, not the model
NAME_KEYS = ("general.name",)


def _gguf(path: Path) -> tuple[dict, dict]:
    """(metadata without the naming keys, {tensor name: (GGML type, raw bytes)}), in file order
    (gguf_check's reader: gguf.GGUFReader takes seconds on a 49k-token vocabulary)."""
    info = read_gguf_info(path)
    md = {k: v for k, v in info.metadata.items() if k not in NAME_KEYS}
    data = Path(path).read_bytes()
    return md, {t.name: (gguf.GGMLQuantizationType(t.ggml_type),
                         data[info.data_offset + t.offset:info.data_offset + t.offset + t.nbytes])
                for t in info.tensors.values()}


def _f32(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32)


@pytest.fixture(scope="module")
def converted_next_orig(tiny_next_ckpt, tmp_path_factory):
    from convert import convert
    _, _, orig, clip = tiny_next_ckpt
    return convert(orig, tmp_path_factory.mktemp("conv-next-orig"), outtype="f32", vision_tower=clip)


def test_anyres_keys_and_newline_are_written(tiny_next_ckpt, converted_next_f32):
    model = tiny_next_ckpt[0]
    md, tensors = _gguf(converted_next_f32.mmproj_path)
    assert md[names.KEY_IMAGE_GRID_PINPOINTS] == TINY_PINPOINTS_GGUF
    assert md[names.KEY_MM_PATCH_MERGE_TYPE] == "spatial_unpad"
    assert md[K.Clip.PROJECTOR_TYPE] == "mlp" and md[names.KEY_LLAVA_LOCAL_IMAGE_TOKENS] == 16   # per tile
    ttype, newline = tensors[names.TN_IMAGE_NEWLINE]
    assert ttype == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(_f32(newline), model.model.image_newline.detach().numpy())
    m = converted_next_f32.manifest
    assert m["anyres"] == {"grid_pinpoints": TINY_PINPOINTS_HW, "pinpoint_order": "height,width",
                           "merge_type": "spatial_unpad"}
    assert m["image_tokens"] == 16
    llm_md, llm_tensors = _gguf(converted_next_f32.llm_path)
    assert not any("newline" in n for n in llm_tensors)


def test_both_layouts_convert_to_the_same_files(converted_next_f32, converted_next_orig):
    """The original layout's CLIP dir holds the pre-training CLIP (perturbed here): the tuned tower
    inside the checkpoint must win, as in the LLaVA repo, or the mmproj tensors differ."""
    for kind in ("mmproj_path", "llm_path"):
        md_a, t_a = _gguf(getattr(converted_next_f32, kind))
        md_b, t_b = _gguf(getattr(converted_next_orig, kind))
        assert md_a == md_b, kind
        assert list(t_a) == list(t_b), kind
        for n in t_a:
            assert t_a[n][0] == t_b[n][0], n
            assert t_a[n][1] == t_b[n][1], n
    assert converted_next_orig.manifest["anyres"] == converted_next_f32.manifest["anyres"]


def test_cli_converts_a_llava_next_dir_with_onnx(tiny_next_ckpt, tmp_path):
    hf = tiny_next_ckpt[1]
    res = CliRunner().invoke(main, ["convert", str(hf), "-o", str(tmp_path), "--outtype", "f32", "--onnx"])
    assert res.exit_code == 0, res.output
    printed = sorted(Path(p).name for p in res.stdout.split())
    assert printed == ["next-hf-llm-F32.gguf", "next-hf-mmproj-F32.gguf", "next-hf-vision.json",
                       "next-hf-vision.onnx", "next-hf.manifest.json"], printed
    manifest = json.loads((tmp_path / "next-hf.manifest.json").read_text())
    sidecar = json.loads((tmp_path / manifest["onnx"]["sidecar"]).read_text())
    # the graph is the per-tile encoder; the tiling travels beside it
    assert sidecar["n_tokens"] == 16 and sidecar["input"]["shape"] == ["batch", 3, 56, 56]
    assert sidecar["anyres"] == manifest["anyres"]
    assert manifest["anyres"]["grid_pinpoints"] == TINY_PINPOINTS_HW


# --- refusals: what we cannot run exactly as transformers' LlavaNext does --------------------------------

def _variant(src: Path, dst: Path, *, config: dict | None = None, drop_tensor: str | None = None,
             preproc: dict | None = None) -> Path:
    """A copy of a checkpoint dir with config.json fields changed (None values removed), a tensor
    dropped, or preprocessor_config.json fields changed; untouched weights are symlinked."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors" and drop_tensor is not None:
            sd = load_file(f)
            save_file({k: v for k, v in sd.items() if k != drop_tensor}, dst / f.name)
        elif f.suffix in (".safetensors", ".bin"):
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    for fname, changes in (("config.json", config), ("preprocessor_config.json", preproc)):
        if changes:
            data = json.loads((dst / fname).read_text())
            data.update(changes)
            data = {k: v for k, v in data.items() if v is not None}
            (dst / fname).write_text(json.dumps(data))
    return dst


HF_REFUSALS = {
    "strategy": (dict(config={"vision_feature_select_strategy": "full"}),
                 ["vision_feature_select_strategy 'full'", "'default'"]),
    "model_type": (dict(config={"model_type": "llava_onevision"}), ["model_type 'llava_onevision'", "'llava_next'"]),
    "pinpoints_not_tiles": (dict(config={"image_grid_pinpoints": [[56, 112], [100, 56]]}),
                            ["image_grid_pinpoints entry 100x56", "56-px tiles"]),
    "pinpoints_empty": (dict(config={"image_grid_pinpoints": []}), ["image_grid_pinpoints must be", "found []"]),
    "pinpoints_disagree": (dict(preproc={"image_grid_pinpoints": [[56, 112]]}),
                           ["preprocessor_config.json image_grid_pinpoints [[56, 112]]", "config.json's"]),
    "no_newline": (dict(drop_tensor="image_newline"), ["without image_newline", "found none"]),
}
ORIGINAL_REFUSALS = {
    "merge_spatial": (dict(config={"mm_patch_merge_type": "spatial"}),
                      ["mm_patch_merge_type 'spatial' unsupported", "'spatial_unpad'"]),
    "anyres_flat": (dict(config={"mm_patch_merge_type": "flat"}),
                    ["image_aspect_ratio 'anyres' needs mm_patch_merge_type 'spatial_unpad'", "found 'flat'"]),
    "aspect": (dict(config={"image_aspect_ratio": "anyres_max_9"}),
               ["image_aspect_ratio 'anyres_max_9' unsupported", "'pad'", "'anyres'"]),
    "no_pinpoints": (dict(config={"image_grid_pinpoints": None}), ["image_grid_pinpoints must be", "found None"]),
    "no_newline": (dict(drop_tensor="model.image_newline"), ["without 'model.image_newline'"]),
}


@pytest.mark.parametrize("case", [("hf", k) for k in HF_REFUSALS] + [("orig", k) for k in ORIGINAL_REFUSALS],
                         ids=lambda c: "-".join(c))
def test_what_we_cannot_run_exactly_is_refused(case, tiny_next_ckpt, tmp_path):
    from convert import convert
    layout, key = case
    _, hf, orig, clip = tiny_next_ckpt
    change, needles = (HF_REFUSALS if layout == "hf" else ORIGINAL_REFUSALS)[key]
    src = _variant(hf if layout == "hf" else orig, tmp_path / "ckpt", **change)
    out = tmp_path / "out"
    extra = ["--vision-tower", str(clip)] if layout == "orig" else []
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), *extra])
    assert_one_line_error(res, *needles)
    assert not out.exists() or not any(out.iterdir()), "a refused checkpoint left files behind"
    with pytest.raises(ConversionError):   # the library raises the domain error the CLI prints
        convert(src, out, vision_tower=clip if layout == "orig" else None)


# --- upstream's legacy LLaVA-1.6 mmproj ---------------------------------------------------------------------

def write_legacy_next_mmproj(path: Path, model, llava_config: dict, *, f16: bool = True) -> Path:
    """An mmproj as people made (and downloaded) them for LLaVA-1.6 with upstream's legacy tools:
    `llava_surgery_v2.py -C` splits the checkpoint's tuned CLIP tower into `llava.clip` and
    `model.mm_projector.*` + `model.image_newline` into `llava.projector`; then
    `convert_image_encoder_to_gguf.py --clip-model-is-vision --llava-projector` reads a CLIPVisionModel
    config carrying the LLaVA config's 1.6 fields (cmp-nct's config_vit.json). What that gives:
    - keys of the 1.5 legacy file (no `general.type`, no feature layer: n_layers - 1 blocks) plus, right
      after `clip.vision.block_count`, `image_grid_pinpoints` (the LLaVA config's list flattened as is: the
      LLaVA repo's (width, height) pairs), `image_crop_resolution` (u32), `image_aspect_ratio` "anyres",
      `image_split_resolution` (u32), `mm_patch_merge_type` "spatial_unpad", `mm_projector_type` "mlp2x_gelu";
    - tensors: the projector (`mm.0`, `mm.2`; matrices F16), then the newline as `model.image_newline`
      (F32, (n_embd,): the legacy converter keeps the LLaVA repo's name), then CLIP (`v.*`, fc1 named ffn_down).
    """
    pj = model.model.multi_modal_projector
    newline = model.model.image_newline.detach().numpy().astype(np.float32)
    keys = {names.KEY_IMAGE_GRID_PINPOINTS: [p for pair in llava_config["image_grid_pinpoints"] for p in pair]}
    keys.update({f"clip.vision.{k}": llava_config[k] for k in ("image_crop_resolution", "image_aspect_ratio",
                                                                "image_split_resolution", "mm_patch_merge_type",
                                                                "mm_projector_type")})
    return write_legacy_mmproj(path, model.model.vision_tower, pj.linear_1, pj.linear_2, f16=f16, extra=keys,
                               name="openai/clip-vit-large-patch14-336",
                               extra_tensors=[(names.TN_IMAGE_NEWLINE_LEGACY, newline)])


@pytest.fixture(scope="module")
def legacy_next(tiny_next_ckpt, tmp_path_factory) -> Path:
    """The tiny LLaVA-1.6 as upstream's legacy tools convert its original layout."""
    model, _, orig, _ = tiny_next_ckpt
    llava_config = json.loads((orig / "config.json").read_text())
    return write_legacy_next_mmproj(tmp_path_factory.mktemp("legacy-next") / "mmproj-model-f16.gguf",
                                    model, llava_config)


def test_legacy_next_file_carries_what_upstream_writes(legacy_next, converted_next_f32):
    md, tensors = _gguf(legacy_next)
    ours, _ = _gguf(converted_next_f32.mmproj_path)
    # the LLaVA repo's (width, height) list flattened as is is the array we write from transformers' (h, w)
    assert md[names.KEY_IMAGE_GRID_PINPOINTS] == ours[names.KEY_IMAGE_GRID_PINPOINTS] == TINY_PINPOINTS_GGUF
    assert md[names.KEY_MM_PATCH_MERGE_TYPE] == "spatial_unpad" and "general.type" not in md
    assert list(tensors)[:5] == ["mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "model.image_newline"]
    assert tensors["model.image_newline"][0] == gguf.GGMLQuantizationType.F32
    assert tensors["mm.0.weight"][0] == gguf.GGMLQuantizationType.F16


def test_mmproj_reader_sees_the_same_tiling_in_legacy_and_ours(legacy_next, converted_next_f32, tiny_next_ckpt):
    """Waits on helper V: formats/mmproj.py must accept the legacy newline name `model.image_newline`."""
    from llava_local.formats.mmproj import read_mmproj
    legacy, ours = read_mmproj(legacy_next), read_mmproj(converted_next_f32.mmproj_path)
    assert legacy.ffn_swapped and not ours.ffn_swapped
    assert legacy.anyres == ours.anyres
    assert [list(p) for p in ours.anyres.grid_pinpoints] == TINY_PINPOINTS_HW
    assert (legacy.image_tokens, legacy.projection_dim, legacy.feature_layer) == \
        (ours.image_tokens, ours.projection_dim, ours.feature_layer) == (16, 64, 2)
    assert torch.equal(tiny_next_ckpt[0].model.image_newline.detach(),
                       torch.from_numpy(_f32(_gguf(legacy_next)[1]["model.image_newline"][1]).copy()))


def test_onnx_export_of_the_legacy_next_mmproj_carries_the_tiling(legacy_next, converted_next_f32):
    """`llava-local convert mmproj-model-f16.gguf --onnx`: the per-tile encoder plus the pinpoints."""
    res = CliRunner().invoke(main, ["convert", str(legacy_next), "-o", str(legacy_next.parent), "--onnx"])
    assert res.exit_code == 0, res.output
    sidecar = json.loads((legacy_next.parent / "mmproj-model-f16-vision.json").read_text())
    assert sidecar["anyres"] == converted_next_f32.manifest["anyres"]
    assert sidecar["n_tokens"] == 16 and sidecar["source"]["layout"] == "mmproj-legacy"
