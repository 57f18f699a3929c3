"""The `native` vision backend (native/, libllava_vision built by `pip install -e .`).

- parity: per-token cosine vs the PyTorch reference (transformers `get_image_features`) >= 0.9999
  with F32 weights and >= 0.999 with F16 (measured: ~1 - 1e-12 for both, see -s output), batch 1
  and batch 4, both attention paths; Q8_0 >= 0.99. The upstream `mtmd` backend's cosine is printed
  beside it (#25814: its CLS-last graph is what this backend exists to fix).
- the library is built and is the backend actually used: a fixture *fails* when it is missing.
- bad input: garbage, truncated and inconsistent files, wrong batch sizes, NaN pixels return errors
  and never take the process down.

    .venv/bin/python -m pytest -q tests/test_native.py -s
"""
from __future__ import annotations

import ctypes
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cosine_per_token, random_image, rewrite_mmproj
from llava_local.errors import BackendUnavailableError, ModelFilesError
from llava_local.formats.mmproj import read_mmproj
from llava_local.image.preprocess import preprocess_batch
from llava_local.vision import VisionOptions, create_backend, preprocess_config

IMAGES = [random_image(80, 60, 1), random_image(40, 90, 2), random_image(56, 56, 3), random_image(200, 30, 4),
          random_image(31, 77, 5)]
MIN_COSINE = {"f32": 0.9999, "f16": 0.999, "q8_0": 0.99}


@pytest.fixture(scope="session")
def native_lib():
    """libllava_vision, loaded. Fails rather than skips: `pip install -e .` builds it on this machine,
    so a missing library means the native build broke (and the engine would silently fall back)."""
    from llava_local.vision.native_backend import load_library
    try:
        return load_library()
    except BackendUnavailableError as exc:
        pytest.fail(f"{exc}; rebuild with `pip install -e .` and read the build output")


@pytest.fixture(scope="module")
def converted(tiny_ckpt, converted_f32, tmp_path_factory):
    """outtype -> mmproj path, all from the same tiny checkpoint."""
    from convert import convert
    from convert.quantize import quantize_mmproj
    f16 = convert(tiny_ckpt[1], tmp_path_factory.mktemp("native-f16"), outtype="f16")
    q8 = tmp_path_factory.mktemp("native-q8") / "mmproj-Q8_0.gguf"
    quantize_mmproj(converted_f32.mmproj_path, q8, "Q8_0")
    return {"f32": converted_f32.mmproj_path, "f16": f16.mmproj_path, "q8_0": q8}


@pytest.fixture(scope="module")
def reference(tiny_model, converted):
    """(pixels, transformers' image features) for IMAGES."""
    pixels = preprocess_batch(IMAGES, preprocess_config(read_mmproj(converted["f32"])))
    with torch.no_grad():
        f = tiny_model.get_image_features(pixel_values=torch.from_numpy(pixels))
    f = getattr(f, "pooler_output", f)
    if isinstance(f, (list, tuple)):
        f = torch.stack(list(f))
    return pixels, f.reshape(pixels.shape[0], -1, f.shape[-1]).numpy()


def _encode_in_batches(backend, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([backend.encode_pixels(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def _mtmd_cosine(mmproj_path: Path, llm_path: Path, ref: np.ndarray) -> np.ndarray:
    from llava_local.runtime.llm import LlamaLLM
    llm = LlamaLLM(llm_path, n_ctx=256)
    mt = create_backend("mtmd", read_mmproj(mmproj_path), llm=llm)
    try:
        return cosine_per_token(mt.encode(IMAGES), ref)
    finally:
        mt.close()
        llm.close()


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_native_matches_pytorch_reference(native_lib, converted, converted_f32, reference, outtype):
    pixels, ref = reference
    mmproj = read_mmproj(converted[outtype])
    backend = create_backend("native", mmproj, VisionOptions(max_batch=4))
    try:
        for batch in (1, 4):
            out = _encode_in_batches(backend, pixels, batch)
            assert out.shape == ref.shape and np.isfinite(out).all()
            cos = cosine_per_token(out, ref)
            print(f"native {outtype.upper()} batch {batch} vs PyTorch: per-token cosine min {cos.min():.10f} "
                  f"mean {cos.mean():.10f}, max |Δ| {np.abs(out - ref).max():.2e} over {cos.size} tokens")
            assert cos.min() >= MIN_COSINE[outtype]
    finally:
        backend.close()
    llm_path = converted_f32.llm_path  # mtmd only needs an LLM of the right width to bind to
    mt = _mtmd_cosine(converted[outtype], llm_path, ref)
    print(f"mtmd   {outtype.upper()}         vs PyTorch: per-token cosine min {mt.min():.4f} mean {mt.mean():.4f} "
          "(upstream #25814)")


@pytest.mark.parametrize("flash_attn, cpu_f32_weights", [(False, True), (True, False), (False, False)])
def test_native_other_paths_match(native_lib, converted, reference, flash_attn, cpu_f32_weights):
    """Softmax attention instead of flash attention; F16 matrices multiplied as F16 (activations rounded)."""
    pixels, ref = reference
    backend = create_backend("native", read_mmproj(converted["f16"]),
                             VisionOptions(max_batch=4, flash_attn=flash_attn, cpu_f32_weights=cpu_f32_weights))
    try:
        cos = cosine_per_token(backend.encode_pixels(pixels[:4]), ref[:4])
    finally:
        backend.close()
    print(f"native F16 flash_attn={flash_attn} cpu_f32_weights={cpu_f32_weights}: cosine min {cos.min():.8f}")
    assert cos.min() >= MIN_COSINE["f16"]


def test_native_q8_0(native_lib, converted, reference):
    pixels, ref = reference
    backend = create_backend("native", read_mmproj(converted["q8_0"]), VisionOptions(max_batch=4))
    try:
        assert native_lib.llava_vision_weight_type(backend.ctx) == b"q8_0"
        cos = cosine_per_token(backend.encode_pixels(pixels[:4]), ref[:4])
    finally:
        backend.close()
    print(f"native Q8_0 vs PyTorch: per-token cosine min {cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() >= MIN_COSINE["q8_0"]


def test_batch_is_independent_of_its_neighbours(native_lib, converted):
    """One graph for the batch must not mix images: image 0 alone equals image 0 in a batch of 4."""
    backend = create_backend("native", read_mmproj(converted["f32"]), VisionOptions(max_batch=4))
    try:
        alone = backend.encode(IMAGES[:1])
        batched = backend.encode(IMAGES[:4])
        longer = backend.encode(IMAGES)              # 5 images: split into graphs of 4 and 1
    finally:
        backend.close()
    np.testing.assert_allclose(batched[:1], alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(longer[:4], batched, rtol=0, atol=1e-5)


def test_engine_uses_native(native_lib, pair_f32):
    from llava_local.runtime.engine import Engine
    from llava_local.vision.native_backend import NativeBackend
    eng = Engine(pair_f32, vision_backend="native", n_ctx=256)
    try:
        assert isinstance(eng.vision, NativeBackend) and eng.vision.name == "native"
        assert eng.vision.device_name.startswith("CPU")
        assert eng.encode_images([IMAGES[0]])[0].shape == (eng.vision.n_tokens, eng.vision.n_embd)
    finally:
        eng.close()


def test_gpu_request_runs_where_ggml_can(native_lib, converted, reference):
    """--vision-device gpu takes the first GPU ggml has (CUDA, Metal...), else the CPU; exact either way."""
    pixels, ref = reference
    backend = create_backend("native", read_mmproj(converted["f32"]), VisionOptions(device="gpu", max_batch=4))
    try:
        cos = cosine_per_token(backend.encode_pixels(pixels[:4]), ref[:4])
        print(f"native with device=gpu ran on {backend.device_name}: cosine min {cos.min():.8f}")
    finally:
        backend.close()
    assert cos.min() >= MIN_COSINE["f32"]


def test_backends_take_one_options_object():
    """Every backend is built as (mmproj, VisionOptions, llm=None): no keyword is swallowed, a device
    other than cpu/gpu is refused when the options are made, and the base class is abstract."""
    import inspect
    from llava_local.errors import LlavaLocalError
    from llava_local.vision import BACKENDS, VisionBackend
    assert sorted(BACKENDS) == ["mtmd", "native", "onnx", "torch"]
    for name, cls in BACKENDS.items():
        assert list(inspect.signature(cls.__init__).parameters) == ["self", "mmproj", "options", "llm"], name
    with pytest.raises(TypeError):
        create_backend("native", None, max_batch=4)       # the old keyword style
    with pytest.raises(LlavaLocalError, match="cpu or gpu"):
        VisionOptions(device="auto")
    with pytest.raises(TypeError, match="abstract"):
        VisionBackend(None)


def test_missing_library_is_backend_unavailable(monkeypatch, tmp_path, converted):
    """What the engine's fallback catches: one BackendUnavailableError naming the reason."""
    import llava_local.vision.native_backend as nb
    monkeypatch.setattr(nb, "_LIB", None)
    monkeypatch.setenv(nb.LIB_ENV, str(tmp_path / "nothing.so"))
    with pytest.raises(BackendUnavailableError, match="native encoder not built"):
        create_backend("native", read_mmproj(converted["f32"]))


# --- bad input: errors, never a crash -------------------------------------------------------------

def _bad_files(good: Path, tmp: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "garbage": b"\x00GARBAGE" * 1000,
        "gguf magic then garbage": b"GGUF" + bytes(range(256)) * 8,
        "truncated header": data[:200],
        "truncated data": data[: len(data) - 1000],
        "empty": b"",
    }
    out = {}
    for name, content in files.items():
        p = tmp / (name.replace(" ", "_") + ".gguf")
        p.write_bytes(content)
        out[name] = p
    out["width disagrees with tensors"] = rewrite_mmproj(good, tmp / "wide.gguf",
                                                     override={"clip.vision.embedding_length": 48})
    out["feature layer past the blocks"] = rewrite_mmproj(good, tmp / "fl.gguf", override={"clip.vision.feature_layer": [7]})
    out["missing block tensor"] = rewrite_mmproj(good, tmp / "missing.gguf", drop_tensor="v.blk.1.attn_k.weight")
    out["missing projector layer"] = rewrite_mmproj(good, tmp / "linear.gguf", drop_tensor="mm.2.weight")
    return out


def test_bad_mmproj_files_raise_model_files_error(native_lib, converted, tmp_path):
    good = read_mmproj(converted["f32"])
    for name, path in _bad_files(converted["f32"], tmp_path).items():
        # the Python reader would catch most of these first: point the parsed info at the bad bytes
        info = dataclasses.replace(good, path=path)
        with pytest.raises(ModelFilesError) as exc:
            create_backend("native", info)
        print(f"{name}: {exc.value}")
        assert str(path) in str(exc.value), name


def test_c_api_rejects_bad_arguments(native_lib, converted):
    lib = native_lib
    err = ctypes.create_string_buffer(512)
    params = lib.llava_vision_default_params()
    assert not lib.llava_vision_init_from_file(None, params, err, len(err))
    assert lib.llava_vision_init_status() == 1
    params.max_batch = 0
    assert not lib.llava_vision_init_from_file(str(converted["f32"]).encode(), params, err, len(err))
    assert b"max_batch" in err.value and lib.llava_vision_init_status() == 1
    params.max_batch = 2
    assert not lib.llava_vision_init_from_file(b"/nonexistent/mmproj.gguf", params, err, len(err))
    assert lib.llava_vision_init_status() == 2 and b"cannot open" in err.value
    ctx = lib.llava_vision_init_from_file(str(converted["f32"]).encode(), params, err, len(err))
    assert ctx and lib.llava_vision_init_status() == 0, err.value
    try:
        s, n, e = (lib.llava_vision_image_size(ctx), lib.llava_vision_n_tokens(ctx), lib.llava_vision_n_embd(ctx))
        fp = ctypes.POINTER(ctypes.c_float)
        pixels = np.zeros((3, 3, s, s), dtype=np.float32)
        out = np.zeros((3, n, e), dtype=np.float32)
        for n_images in (0, -1, 3):                  # 3 > max_batch
            rc = lib.llava_vision_encode_batch(ctx, pixels.ctypes.data_as(fp), n_images, out.ctypes.data_as(fp),
                                               err, len(err))
            assert rc == 1 and b"max_batch" in err.value, (n_images, rc, err.value)
        rc = lib.llava_vision_encode_batch(ctx, None, 1, out.ctypes.data_as(fp), err, len(err))
        assert rc == 1
        pixels[1, 2, 3, 4] = np.nan
        rc = lib.llava_vision_encode_batch(ctx, pixels.ctypes.data_as(fp), 2, out.ctypes.data_as(fp), err, len(err))
        assert rc == 1 and b"NaN" in err.value
        rc = lib.llava_vision_encode_batch(ctx, pixels.ctypes.data_as(fp), 1, out.ctypes.data_as(fp), err, len(err))
        assert rc == 0 and np.isfinite(out[0]).all(), err.value
    finally:
        lib.llava_vision_free(ctx)
    lib.llava_vision_free(None)


def test_binding_rejects_bad_pixels(native_lib, converted):
    backend = create_backend("native", read_mmproj(converted["f32"]), VisionOptions(max_batch=2))
    try:
        s = backend.mmproj.image_size
        with pytest.raises(ValueError, match="expected"):
            backend.encode_pixels(np.zeros((1, 3, s + 1, s), dtype=np.float32))
        bad = np.zeros((1, 3, s, s), dtype=np.float32)
        bad[0, 0, 0, 0] = np.inf
        with pytest.raises(ValueError, match="NaN or infinity"):
            backend.encode_pixels(bad)
        assert backend.encode_pixels(np.zeros((0, 3, s, s), dtype=np.float32)).shape == (0, backend.n_tokens,
                                                                                          backend.n_embd)
    finally:
        backend.close()


@pytest.mark.slow
def test_cmake_builds_from_scratch(tmp_path):
    """The CMakeLists.txt that setup.py runs, in a clean build directory (what a fresh clone does)."""
    import subprocess
    repo = Path(__file__).resolve().parents[1]
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build native/"
    import llama_cpp
    subprocess.run([cmake, "-S", str(repo), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DLLAMA_CPP_DIR={Path(llama_cpp.__file__).parent}",
                    f"-DLLAVA_VISION_OUTPUT_DIR={tmp_path / 'out'}"], check=True)
    subprocess.run([cmake, "--build", str(tmp_path), "--parallel", "2"], check=True)
    from llava_local.vision.native_backend import LIB_NAME
    assert (tmp_path / "out" / LIB_NAME).is_file()


def test_auto_picks_native_when_built(pair_f32):
    """`--vision-backend auto` uses the native encoder when it is built (not a silent fallback) for
    one-shot work (no PyTorch import); long CPU sessions get PyTorch's faster CPU kernels."""
    from llava_local.runtime.engine import Engine
    eng = Engine(pair_f32, vision_backend="auto", n_ctx=256, workload="oneshot")
    try:
        assert eng.vision.name == "native"
    finally:
        eng.close()
    eng = Engine(pair_f32, vision_backend="auto", n_ctx=256, workload="session")
    try:
        assert eng.vision.name == "torch" and eng.placement.vision_device == "cpu"
    finally:
        eng.close()


def test_auto_falls_back_with_one_log_line(pair_f32, monkeypatch, caplog):
    import logging

    from llava_local.runtime.engine import Engine
    from llava_local.errors import BackendUnavailableError
    from llava_local.vision import BACKENDS

    class Missing:
        def __init__(self, *a, **k):
            raise BackendUnavailableError("native encoder not built: test")
    monkeypatch.setitem(BACKENDS, "native", Missing)
    with caplog.at_level(logging.WARNING, logger="llava_local.runtime.engine"):
        eng = Engine(pair_f32, vision_backend="auto", n_ctx=256, workload="oneshot")
    try:
        assert eng.vision.name == "torch"
        lines = [r.getMessage() for r in caplog.records if "native" in r.getMessage()]
        assert len(lines) == 1 and "not built" in lines[0]
    finally:
        eng.close()
