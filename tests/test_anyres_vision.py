"""LLaVA-1.6 ("anyres") vision: tiles, token counts and packed embeddings equal transformers' LlavaNext.

On the tiny random LlavaNext (56-px tiles, pinpoints 1x2, 2x1, 2x2, 3x1, 1x3 tiles) converted to F32:
- our base image + tiles, normalised, equal the pixel_values of `LlavaNextImageProcessor` (which resolves
  to its PIL variant here: torchvision is not installed);
- the tokens per image equal the image tokens LlavaNextProcessor puts in input_ids, for every aspect;
- `embed` on torch, onnx and native (all images' tiles in one batch, packed with the newline vector)
  equals transformers' `get_image_features(...).pooler_output` within max |Δ| 1e-4 for 1:1, 2:1, 1:3,
  5:4 and a 20x300 strip; `max_tiles` equals transformers run with only the pinpoints it keeps;
- tiny, thin and panorama images neither crash nor allocate past the largest pinpoint; anyres files we
  cannot run exactly are refused by both readers (Python and libllava_vision).

    .venv/bin/python -m pytest -q tests/test_anyres_vision.py -s
"""
from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_embeddings_close, random_image, rewrite_mmproj
from llava_local.errors import LlavaLocalError, ModelFilesError
from llava_local.formats.mmproj import AnyresSpec, read_image_newline, read_mmproj
from llava_local.image.anyres import anyres_tiles, image_token_count
from llava_local.image.preprocess import normalize
from llava_local.vision import VisionOptions, create_backend, preprocess_config

# (width, height): aspects 1:1, 2:1, 1:3, 5:4, 3:4, a 20x300 strip; some smaller than a pinpoint, some larger.
# 5:4 unpads feature rows, 3:4 columns; the strip at 56-px tiles keeps no feature column (newlines only).
ASPECTS = {"1:1": (130, 130), "2:1": (150, 75), "1:3": (40, 120), "5:4": (250, 200), "3:4": (90, 120),
           "strip": (20, 300)}
IMAGES = {name: random_image(w, h, seed=i) for i, (name, (w, h)) in enumerate(ASPECTS.items())}
BACKENDS = ("torch", "onnx", "native")


@pytest.fixture(scope="module")
def next_mmproj(converted_next_f32):
    return read_mmproj(converted_next_f32.mmproj_path)


@pytest.fixture(scope="module")
def next_onnx(next_mmproj, tmp_path_factory) -> Path:
    from convert.onnx_export import export_onnx_from_mmproj
    return export_onnx_from_mmproj(next_mmproj.path, tmp_path_factory.mktemp("next-onnx"))


@pytest.fixture(scope="module")
def backends(next_mmproj, next_onnx):
    made = {name: create_backend(name, next_mmproj, VisionOptions(onnx_path=next_onnx)) for name in BACKENDS}
    yield made
    for b in made.values():
        b.close()


@pytest.fixture(scope="module")
def hf(tiny_next_ckpt):
    """(model, image processor, processor) of transformers' LlavaNext, from the tiny checkpoint's files."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextProcessor
    model, hf_dir = tiny_next_ckpt[0], tiny_next_ckpt[1]
    image_processor = LlavaNextImageProcessor.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # what llava-hf's processors say: CLS is the one extra token of the tower, dropped by "default"
    processor = LlavaNextProcessor(image_processor, tok, patch_size=model.config.vision_config.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, image_processor, processor


def _reference(model, image_processor, images) -> list[np.ndarray]:
    """transformers' packed features, one (n_tokens, n_embd) array per image."""
    inputs = image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    return [f.numpy() for f in out.pooler_output]


@contextlib.contextmanager
def _pinpoints(model, image_processor, pinpoints):
    """transformers run with another pinpoints list (the model and its processor both read it)."""
    old = model.config.image_grid_pinpoints, image_processor.image_grid_pinpoints
    model.config.image_grid_pinpoints = image_processor.image_grid_pinpoints = [list(p) for p in pinpoints]
    try:
        yield
    finally:
        model.config.image_grid_pinpoints, image_processor.image_grid_pinpoints = old


@pytest.fixture(scope="module")
def reference(hf):
    return dict(zip(IMAGES, _reference(hf[0], hf[1], list(IMAGES.values()))))


def test_mmproj_reads_the_tiling(next_mmproj, tiny_next_ckpt):
    cfg = tiny_next_ckpt[0].config
    assert next_mmproj.anyres == AnyresSpec(tuple(tuple(p) for p in cfg.image_grid_pinpoints))
    assert next_mmproj.image_tokens == 16                     # one 56-px tile of 14-px patches
    # base 16 + the 2x2 grid (8 x 8 features) + 8 newlines; an image of the grid's own aspect reaches it
    assert next_mmproj.max_image_tokens() == 16 + 8 * 8 + 8 == image_token_count(next_mmproj, 112, 112)
    assert next_mmproj.max_image_tokens(max_tiles=2) == 16 + 8 * 4 + 8
    newline = read_image_newline(next_mmproj)
    np.testing.assert_array_equal(newline, tiny_next_ckpt[0].model.image_newline.detach().numpy())


@pytest.mark.parametrize("name", ASPECTS)
def test_tiles_equal_the_image_processor(next_mmproj, hf, name):
    img = IMAGES[name]
    tiles = anyres_tiles(img, next_mmproj)
    ours = np.stack([normalize(t, preprocess_config(next_mmproj)) for t in tiles])   # (1 + n_tiles, 3, S, S)
    theirs = hf[1](images=[img], return_tensors="np")
    assert tuple(theirs["image_sizes"][0]) == (img.height, img.width)
    ref = theirs["pixel_values"][0]
    assert ref.shape == ours.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)   # float32 rounding of the normalisation: 1-2 ulp
    raw = hf[1](images=[img], return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values"][0]
    np.testing.assert_array_equal(np.stack([np.asarray(t).transpose(2, 0, 1) for t in tiles]), raw)   # same bytes


@pytest.mark.parametrize("max_tiles", [None, 2, 3])
def test_token_counts_equal_the_processor(next_mmproj, hf, max_tiles):
    """The processor's <image> tokens in input_ids, for each aspect, 1x1 and a panorama."""
    model, image_processor, processor = hf
    images = list(IMAGES.values()) + [random_image(1, 1, 9), random_image(600, 12, 10)]
    pinpoints = next_mmproj.anyres.pinpoints(next_mmproj.image_size, max_tiles)
    with _pinpoints(model, image_processor, pinpoints):
        for img in images:
            ids = processor(images=[img], text="<image>", return_tensors="np")["input_ids"][0]
            want = int((ids == processor.image_token_id).sum())
            assert image_token_count(next_mmproj, *img.size, max_tiles=max_tiles) == want, img.size
        # the counting alone, over many sizes (no pixels): the processor's own formula, less CLS
        for w, h in [(1, 1), (1, 999), (999, 1), (56, 56), (57, 113), (3, 7), (4000, 30), (111, 169), (500, 499)]:
            want = processor._get_number_of_features(h, w, 56, 56) - 1
            assert image_token_count(next_mmproj, w, h, max_tiles=max_tiles) == want, (w, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embeddings_equal_transformers(backends, reference, backend):
    b = backends[backend]
    out = b.embed(list(IMAGES.values()))          # every image's base + tiles in one batch
    worst = {}
    for (name, img), got in zip(IMAGES.items(), out):
        assert got.dtype == np.float32 and got.shape[0] == b.tokens_for(*img.size)
        worst[name] = assert_embeddings_close(got, reference[name], max_abs=1e-4)
    print(f"{backend} vs transformers LlavaNext get_image_features: max |Δ| "
          + ", ".join(f"{k} {v:.1e} ({len(reference[k])} tokens)" for k, v in worst.items()))


def test_max_tiles_equals_transformers_with_those_pinpoints(next_mmproj, hf):
    model, image_processor, _ = hf
    b = create_backend("torch", next_mmproj, VisionOptions(max_tiles=2))
    images = [IMAGES["1:1"], IMAGES["strip"]]
    with _pinpoints(model, image_processor, next_mmproj.anyres.pinpoints(next_mmproj.image_size, 2)):
        ref = _reference(model, image_processor, images)
    for got, want in zip(b.embed(images), ref):
        assert_embeddings_close(got, want, max_abs=1e-4)
    assert len(ref[0]) < image_token_count(next_mmproj, 130, 130)     # fewer tiles, fewer tokens
    with pytest.raises(LlavaLocalError, match="allows none"):
        create_backend("torch", next_mmproj, VisionOptions(max_tiles=1))
    with pytest.raises(LlavaLocalError, match="at least 1"):
        VisionOptions(max_tiles=0)


def test_encode_points_to_embed(backends):
    with pytest.raises(LlavaLocalError, match=r"embed\(\)"):
        backends["torch"].encode([IMAGES["1:1"]])


def test_extreme_images(backends, next_mmproj):
    """1x1, 1-px lines and a panorama: bounded tiles, token counts that embed keeps, no crash."""
    b = backends["native"]
    images = [random_image(1, 1, 1), random_image(1, 700, 2), random_image(3000, 2, 3), random_image(5000, 300, 4)]
    for img in images:
        tiles = anyres_tiles(img, next_mmproj)
        assert 3 <= len(tiles) <= 5 and all(t.size == (56, 56) and t.mode == "RGB" for t in tiles)
    out = b.embed(images)
    for img, got in zip(images, out):
        assert got.shape == (b.tokens_for(*img.size), 64) and np.isfinite(got).all()
    assert b.embed([]) == []


def test_mtmd_returns_its_own_token_counts(converted_next_f32, next_mmproj):
    """llama.cpp's clip graph tiles its own way (overview + raw tiles, no unpadding, no newlines):
    inexact, but `embed` and `tokens_for` agree, image by image."""
    from llava_local.runtime.llm import LlamaLLM
    llm = LlamaLLM(converted_next_f32.llm_path, n_ctx=256)
    # one thread: ggml's spinning worker threads take seconds per tile on a busy 2-core runner
    b = create_backend("mtmd", next_mmproj, VisionOptions(threads=1), llm=llm)
    try:
        images = [IMAGES["1:1"], IMAGES["strip"]]
        got = [e.shape for e in b.embed(images)]
        assert got == [(b.tokens_for(*im.size), 64) for im in images]
        assert got[0][0] == 16 * (1 + 4)          # base + a 2x2 grid, 16 tokens each
    finally:
        b.close()
        llm.close()


# --- files we cannot run exactly: refused by the Python reader and by libllava_vision ---
def test_legacy_newline_name_is_read(next_mmproj, backends, reference, tmp_path):
    """upstream's legacy converter names the vector model.image_newline: same model, same embeddings."""
    path = rewrite_mmproj(next_mmproj.path, tmp_path / "legacy-newline.gguf", rename={"v.image_newline": "model.image_newline"})
    mm = read_mmproj(path)
    assert mm.anyres == next_mmproj.anyres
    b = create_backend("native", mm)
    try:
        assert_embeddings_close(b.embed([IMAGES["5:4"]])[0], reference["5:4"], max_abs=1e-4)
    finally:
        b.close()


BAD = {  # name: (rewrite arguments, what the Python error says)
    "no newline tensor": (dict(drop_tensor="v.image_newline"), "without the v.image_newline"),
    "flat merging": (dict(override={"clip.vision.mm_patch_merge_type": "flat"}), "spatial_unpad"),
    "unknown merging": (dict(override={"clip.vision.mm_patch_merge_type": "spatial"}), "unsupported"),
    "odd pinpoints": (dict(override={"clip.vision.image_grid_pinpoints": [112, 56, 56]}), "even-length"),
    "pinpoint not whole tiles": (dict(override={"clip.vision.image_grid_pinpoints": [112, 56, 60, 112]}),
                                 "whole 56-px tiles"),
}


@pytest.mark.parametrize("case", BAD)
def test_files_we_cannot_run_are_refused(next_mmproj, tmp_path, case):
    kwargs, needle = BAD[case]
    path = rewrite_mmproj(next_mmproj.path, tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ModelFilesError, match=needle):
        read_mmproj(path)
    if case in ("no newline tensor", "flat merging", "unknown merging"):   # what the C reader checks itself
        from llava_local.vision.native_backend import ERR_LEN, load_library
        lib = load_library()
        err = ctypes.create_string_buffer(ERR_LEN)
        assert not lib.llava_vision_init_from_file(str(path).encode(), lib.llava_vision_default_params(), err,
                                                   ERR_LEN)
        assert err.value, case
