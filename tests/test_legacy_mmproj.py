"""mmproj files made by upstream llama.cpp's legacy LLaVA converter run exactly on every exact backend.

`tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py` (llava-surgery + CLIP dir -> the
`mmproj-model-f16.gguf` people download for LLaVA-1.5) writes, and `write_legacy_mmproj` below
writes the same way with the gguf package:
- CLIP's `mlp.fc1` as `v.blk.N.ffn_down`, `mlp.fc2` as `v.blk.N.ffn_up` (clip.cpp swaps them back by shape);
- only n_layers - 1 blocks (it pops the last one) and no `clip.vision.feature_layer`; no post-layernorm,
  no `general.type`; `clip.has_text_encoder` false, `clip.vision.projection_dim` = CLIP's own
  projection width, `clip.use_gelu` = (hidden_act == "gelu");
- the projector first, as `mm.0`/`mm.2`; F16 for every 4-D tensor and, in its default F16 mode,
  for every 2-D `.weight` (position embeddings included), F32 for the rest; the projector's matrices
  are F16 even with --use-f32.

Checks: (a) torch, native and onnx (exported from that mmproj by `llava-local convert MMPROJ --onnx`)
equal transformers' `get_image_features` on the weights the file holds (F16-rounded), and stay
within F16 rounding of the F32 model; (b) with our LLM GGUF the greedy answer through `auto`,
`native` and `torch` equals transformers' greedy answer; (c) a square MLP (n_ff == hidden), where
shapes cannot tell the namings apart, is read by `general.type` (documented in llava_local/formats/mmproj.py);
`clip.use_gelu` runs erf GELU; a LLaVA-1.6 file is refused by both readers.

    .venv/bin/python -m pytest -q tests/test_legacy_mmproj.py -s
"""
from __future__ import annotations

import copy
import ctypes
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import IMAGES, assert_embeddings_close, cosine_per_token, reference_image_features
from llava_local.cli.main import main
from llava_local.runtime.engine import Engine
from llava_local.errors import BackendUnavailableError, ModelFilesError
from llava_local.formats.mmproj import read_mmproj
from llava_local.runtime.model_pair import resolve_pair
from llava_local.image.preprocess import preprocess_batch
from llava_local.runtime.sampling import SamplingParams
from llava_local.prompts.templates import Message
from llava_local.vision import create_backend, preprocess_config

K = gguf.Keys
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# upstream's legacy tensor names for HF CLIP (its get_tensor_name), one source name per line
LEGACY_TOP = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
LEGACY_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down",     # sic: upstream's legacy naming, the reason for this file
    "mlp.fc2": "ffn_up",
}
NAMED_RIGHT = {**LEGACY_BLOCK, "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}   # ours / convert_hf_to_gguf.py
PROJECTOR = {"linear_1": "mm.0", "linear_2": "mm.2"}    # llava-surgery's model.mm_projector.0 / .2


def _stored(arr: np.ndarray, name: str, f16: bool, projector: bool) -> np.ndarray:
    """The array as the legacy converter stores it (its per-tensor F16/F32 rule)."""
    arr = arr.squeeze()
    if arr.ndim == 4 or (arr.ndim == 2 and (projector or (f16 and name.endswith(".weight")))):
        return arr.astype(np.float16)
    return arr.astype(np.float32)


def legacy_tensors(clip, linear_1, linear_2, n_blocks: int, *, f16: bool = True,
                   block_names: dict = LEGACY_BLOCK) -> list[tuple[str, np.ndarray, torch.Tensor]]:
    """(GGUF name, stored array, source parameter), in the converter's order: projector, then CLIP."""
    out = []
    for key, lin in (("linear_1", linear_1), ("linear_2", linear_2)):
        for sfx in (".weight", ".bias"):
            p = getattr(lin, sfx[1:])
            out.append((PROJECTOR[key] + sfx, _stored(p.detach().numpy(), sfx, f16, True), p))
    params = dict(clip.named_parameters())
    vm = "vision_model." if any(k.startswith("vision_model.") for k in params) else ""
    for rel, gname in LEGACY_TOP.items():
        p = params[vm + rel]
        out.append((gname, _stored(p.detach().numpy(), gname, f16, False), p))
    for bid in range(n_blocks):   # the last CLIP layer is dropped: LLaVA reads the one before
        for rel, short in block_names.items():
            for sfx in (".weight", ".bias"):
                p = params[f"{vm}encoder.layers.{bid}.{rel}{sfx}"]
                gname = f"v.blk.{bid}.{short}{sfx}"
                out.append((gname, _stored(p.detach().numpy(), gname, f16, False), p))
    return out


def write_legacy_mmproj(path: Path, clip, linear_1, linear_2, *, f16: bool = True, extra: dict | None = None,
                        block_names: dict = LEGACY_BLOCK, general_type: bool = False, name: str = "tiny-clip",
                        extra_tensors: list | None = None) -> Path:
    """An mmproj as upstream's convert_image_encoder_to_gguf.py --llava-projector writes one for a CLIP
    config without vision_feature_layer (LLaVA-1.5's openai/clip-vit-large-patch14-336). `extra` keys
    (str, int or list values) follow `clip.vision.block_count`; `extra_tensors` (name, array) follow
    the projector's, as the LLaVA-1.6 newline does."""
    v = clip.config
    n_blocks = v.num_hidden_layers - 1
    tensors = legacy_tensors(clip, linear_1, linear_2, n_blocks, f16=f16, block_names=block_names)
    tensors[4:4] = [(n, arr, None) for n, arr in extra_tensors or ()]
    w = gguf.GGUFWriter(str(path), "clip")
    if general_type:   # not upstream's legacy converter: ours and convert_hf_to_gguf.py write it
        w.add_type(gguf.GGUFType.MMPROJ)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool(K.Clip.HAS_VISION_ENCODER, True)
    w.add_bool(K.Clip.HAS_LLAVA_PROJECTOR, True)
    w.add_file_type(1 if f16 else 0)
    w.add_name(name)
    w.add_description("image encoder for LLaVA")
    w.add_string(K.Clip.PROJECTOR_TYPE, "mlp")
    w.add_uint32(K.ClipVision.IMAGE_SIZE, v.image_size)
    w.add_uint32(K.ClipVision.PATCH_SIZE, v.patch_size)
    w.add_uint32(K.ClipVision.EMBEDDING_LENGTH, v.hidden_size)
    w.add_uint32(K.ClipVision.FEED_FORWARD_LENGTH, v.intermediate_size)
    w.add_uint32(K.ClipVision.PROJECTION_DIM, v.projection_dim)   # CLIP's own, not the LLM width
    w.add_uint32(K.ClipVision.Attention.HEAD_COUNT, v.num_attention_heads)
    w.add_float32(K.ClipVision.Attention.LAYERNORM_EPS, v.layer_norm_eps)
    w.add_uint32(K.ClipVision.BLOCK_COUNT, n_blocks)
    for key, val in (extra or {}).items():
        (w.add_string if isinstance(val, str) else w.add_uint32 if isinstance(val, int) else w.add_array)(key, val)
    w.add_array(K.ClipVision.IMAGE_MEAN, CLIP_MEAN)
    w.add_array(K.ClipVision.IMAGE_STD, CLIP_STD)
    w.add_bool(K.ClipVision.USE_GELU, v.hidden_act == "gelu")
    for gname, arr, _ in tensors:
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _parts(model):
    pj = model.model.multi_modal_projector
    return model.model.vision_tower, pj.linear_1, pj.linear_2


@pytest.fixture(scope="module")
def legacy(tiny_model, tmp_path_factory) -> Path:
    return write_legacy_mmproj(tmp_path_factory.mktemp("legacy") / "mmproj-model-f16.gguf", *_parts(tiny_model))


@pytest.fixture(scope="module")
def as_stored(tiny_model):
    """The tiny LLaVA with every weight the legacy file stores in F16 rounded to it: what the file holds."""
    model = copy.deepcopy(tiny_model)
    clip, l1, l2 = _parts(model)
    with torch.no_grad():
        for _, arr, p in legacy_tensors(clip, l1, l2, clip.config.num_hidden_layers - 1):
            if arr.dtype == np.float16:
                p.copy_(torch.from_numpy(arr.astype(np.float32)).reshape(p.shape))
    return model


@pytest.fixture(scope="module")
def reference(legacy, tiny_model, as_stored):
    """(pixels, transformers on the stored weights, transformers on the F32 weights) for IMAGES."""
    pixels = preprocess_batch(IMAGES, preprocess_config(read_mmproj(legacy)))
    return pixels, reference_image_features(as_stored, pixels), reference_image_features(tiny_model, pixels)


@pytest.fixture(scope="module")
def onnx_export(legacy):
    """`llava-local convert mmproj-model-f16.gguf -o <its folder> --onnx`."""
    res = CliRunner().invoke(main, ["convert", str(legacy), "-o", str(legacy.parent), "--onnx"])
    assert res.exit_code == 0, res.output
    return [Path(p) for p in res.stdout.split()]


def test_reader_sees_the_legacy_layout(legacy, converted_f32):
    mm, ours = read_mmproj(legacy), read_mmproj(converted_f32.mmproj_path)
    assert mm.ffn_swapped and not ours.ffn_swapped
    assert (mm.n_ff, mm.feature_layer, mm.n_layers, mm.ffn_act) == (ours.n_ff, 2, 2, "quick_gelu")
    assert (mm.image_tokens, mm.projection_dim) == (ours.image_tokens, ours.projection_dim)
    assert mm.gguf.tensors["v.blk.0.ffn_down.weight"].shape == (32, 128)   # ggml (in, out): fc1


def test_convert_mmproj_onnx_cli(onnx_export, legacy):
    assert [p.name for p in onnx_export] == ["mmproj-model-f16-vision.onnx", "mmproj-model-f16-vision.json"]
    assert all(p.is_file() for p in onnx_export)
    res = CliRunner().invoke(main, ["convert", str(legacy), "-o", str(legacy.parent)])
    assert res.exit_code == 2 and "only with --onnx" in res.output
    res = CliRunner().invoke(main, ["convert", str(legacy), "-o", str(legacy.parent), "--onnx", "--quantize", "Q8_0"])
    assert res.exit_code == 2 and "--quantize" in res.output


@pytest.mark.parametrize("backend", ["torch", "native", "onnx"])
def test_exact_backends_equal_transformers(backend, legacy, reference, request):
    if backend == "onnx":
        request.getfixturevalue("onnx_export")   # found next to the mmproj by its stem
    pixels, stored_ref, f32_ref = reference
    try:
        b = create_backend(backend, read_mmproj(legacy))
    except BackendUnavailableError as exc:   # `pip install -e .` builds native/: missing means broken
        pytest.fail(f"{backend}: {exc}")
    try:
        out = np.concatenate([b.encode_pixels(pixels[:1]), b.encode_pixels(pixels[1:])])   # batch 1 and 3
    finally:
        b.close()
    cos = cosine_per_token(out, stored_ref)
    d = assert_embeddings_close(out, stored_ref, max_abs=2e-5)   # measured <= 4.3e-6 (native)
    cos32, d32 = cosine_per_token(out, f32_ref), np.abs(out - f32_ref).max()
    print(f"{backend} on legacy mmproj vs transformers (stored F16 weights): cosine min {cos.min():.10f}, "
          f"max |Δ| {d:.2e}; vs the F32 model: cosine min {cos32.min():.8f}, max |Δ| {d32:.2e}")
    assert cos.min() >= 0.9999 and cos32.min() >= 0.9999


# One thread for llama.cpp: the tiny LLM needs no more, and on a shared 2-core machine ggml's spinning
# barrier with 2 threads measured 0.05 s to 10 s per 16-token answer, 1 thread 0.05-0.09 s.
THREADS = 1


@pytest.fixture()
def torch_threads():
    """Engine(threads=...) also sets torch's process-wide thread count (torch backend): put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def greedy_reference(legacy, converted_f32, as_stored):
    """(pair, prompt, image, transformers' greedy tokens): image features and LLM both transformers'."""
    pair = resolve_pair(converted_f32.llm_path, legacy)
    prompt, img = "Describe the image.", IMAGES[1]
    eng = Engine(pair, vision_backend="native", n_ctx=512, threads=THREADS)
    try:
        items = eng.prompt_items([Message("user", "<image>\n" + prompt)])
        eos = eng.llm.eos
        pixels = preprocess_batch([img], eng.vision.preprocess_config)
    finally:
        eng.close()
    image = torch.from_numpy(reference_image_features(as_stored, pixels)[0])
    table = as_stored.get_input_embeddings()
    with torch.no_grad():
        seq = torch.cat([image if not isinstance(it, list) else table(torch.tensor(it)) for it in items if it != []])
        tokens = []
        for _ in range(16):
            nxt = int(as_stored(inputs_embeds=seq[None]).logits[0, -1].argmax())
            if nxt == eos:
                break
            tokens.append(nxt)
            seq = torch.cat([seq, table(torch.tensor([nxt]))])
    return pair, prompt, img, tokens


@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
def test_greedy_answer_equals_transformers(backend, greedy_reference, torch_threads):
    pair, prompt, img, ref_tokens = greedy_reference
    eng = Engine(pair, vision_backend=backend, n_ctx=512, precise=True, threads=THREADS)
    try:
        ans = eng.ask(prompt, [img], max_tokens=16, sampling=SamplingParams(temperature=0.0))
        used = eng.vision.name
        assert eng.vision.exact
    finally:
        eng.close()
    print(f"greedy, legacy mmproj, {backend} ({used}): {ans.tokens}\n      transformers: {ref_tokens}")
    assert ans.tokens == ref_tokens and len(ref_tokens) == 16


# --- (c) square MLP, clip.use_gelu, LLaVA-1.6 ---
def _small_llava_vision(intermediate: int, hidden_act: str = "quick_gelu", seed: int = 7):
    """A 3-layer CLIP + mlp2x_gelu projector with random weights that F16 stores exactly, so every
    layout's file holds the very weights transformers runs."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=14, hidden_act=hidden_act, projection_dim=16)
    clip = CLIPVisionModel(cfg).eval()
    l1, l2 = torch.nn.Linear(32, 48), torch.nn.Linear(48, 24)
    with torch.no_grad():
        for p in [*clip.parameters(), *l1.parameters(), *l2.parameters()]:
            p.copy_((p + 0.05 * torch.randn_like(p)).half().float())
    return clip, l1, l2


def _llava_features(clip, l1, l2, pixels: np.ndarray) -> np.ndarray:
    """LLaVA-1.5's vision path in transformers: hidden_states[-2], CLS dropped, Linear-GELU-Linear."""
    with torch.no_grad():
        h = clip(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
        return l2(torch.nn.functional.gelu(l1(h))).numpy()


def _assert_backends_match(mm, ref: np.ndarray, pixels: np.ndarray, what: str) -> None:
    for name in ("torch", "native"):
        b = create_backend(name, mm)
        try:
            out = b.encode_pixels(pixels)
        finally:
            b.close()
        d = assert_embeddings_close(out, ref, max_abs=2e-5)
        print(f"{what}, {name}: max |Δ| vs transformers {d:.2e}")


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """A square CLIP MLP (n_ff == hidden) in the legacy layout and in ours; (paths, pixels, reference)."""
    clip, l1, l2 = _small_llava_vision(intermediate=32)
    root = tmp_path_factory.mktemp("square")
    files = {"legacy": write_legacy_mmproj(root / "legacy.gguf", clip, l1, l2),
             "named": write_legacy_mmproj(root / "named.gguf", clip, l1, l2, block_names=NAMED_RIGHT,
                                          general_type=True)}
    pixels = preprocess_batch(IMAGES[:2], preprocess_config(read_mmproj(files["named"])))
    return files, pixels, _llava_features(clip, l1, l2, pixels)


@pytest.mark.parametrize("layout, swapped", [("legacy", True), ("named", False)])
def test_square_mlp_is_read_by_general_type(square, layout, swapped, caplog):
    files, pixels, ref = square
    with caplog.at_level(logging.WARNING, logger="llava_local.formats.mmproj"):
        mm = read_mmproj(files[layout])
    assert mm.ffn_swapped is swapped and mm.n_ff == mm.hidden_size == 32
    assert ("square CLIP MLP" in caplog.text) is swapped
    _assert_backends_match(mm, ref, pixels, f"square MLP, {layout} names")


def test_use_gelu_runs_erf_gelu(tmp_path):
    """hidden_act "gelu" (erf in transformers) is what the legacy converter marks with clip.use_gelu."""
    clip, l1, l2 = _small_llava_vision(intermediate=64, hidden_act="gelu")
    mm = read_mmproj(write_legacy_mmproj(tmp_path / "mmproj-gelu.gguf", clip, l1, l2))
    assert (mm.ffn_act, mm.ffn_swapped) == ("gelu", True)
    pixels = preprocess_batch(IMAGES[:2], preprocess_config(mm))
    _assert_backends_match(mm, _llava_features(clip, l1, l2, pixels), pixels, "clip.use_gelu")


def test_llava_16_mmproj_is_refused_by_both_readers(tiny_model, tmp_path):
    from llava_local.vision.native_backend import ERR_LEN, load_library
    path = write_legacy_mmproj(tmp_path / "mmproj-1.6.gguf", *_parts(tiny_model),
                               extra={"clip.vision.image_grid_pinpoints": [56, 112, 112, 56],
                                      "clip.vision.mm_patch_merge_type": "spatial_unpad"})
    with pytest.raises(ModelFilesError, match="LLaVA-1.6"):
        read_mmproj(path)
    lib = load_library()
    err = ctypes.create_string_buffer(ERR_LEN)
    assert not lib.llava_vision_init_from_file(str(path).encode(), lib.llava_vision_default_params(), err, ERR_LEN)
    assert b"LLaVA-1.6" in err.value
