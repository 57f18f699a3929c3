"""The ONNX vision encoder: `convert --onnx` (convert/onnx_export.py) and the `onnx` backend.

- fidelity: ONNX embeddings equal transformers' `get_image_features` within max |Δ| <= 1e-4 on four
  aspect ratios, batch 1 and batch 4; the engine's greedy answer equals the torch backend's;
- safety (RELIABILITY.md "ONNX with external data pointing outside its folder"): the exporter
  refuses names that leave its output folder and leaves nothing behind on failure; the backend
  refuses crafted external-data locations before onnxruntime opens the file, and the CLI reports
  that as one `Error:` line.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import IMAGES, assert_embeddings_close, reference_image_features
from llava_local.cli.main import main
from llava_local.errors import BackendUnavailableError, ConversionError, ModelFilesError
from llava_local.image.preprocess import preprocess_batch
from llava_local.vision import VisionOptions, create_backend
from llava_local.vision.onnx_backend import choose_providers

import onnx  # noqa: E402  (a core dependency: these tests must run, never skip)



@pytest.fixture(scope="module")
def onnx_convert(tiny_ckpt, tmp_path_factory):
    """`llava-local convert --onnx` of the tiny model: (CliRunner result, output dir, seconds)."""
    out = tmp_path_factory.mktemp("conv-onnx")
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["convert", str(tiny_ckpt[1]), "-o", str(out), "--outtype", "f32", "--onnx"])
    return res, out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def onnx_pair(onnx_convert):
    from llava_local.runtime.model_pair import resolve_pair
    res, out, _ = onnx_convert
    assert res.exit_code == 0, res.output
    return resolve_pair(out)


@pytest.fixture(scope="module")
def onnx_backend(onnx_pair):
    b = create_backend("onnx", onnx_pair.mmproj)
    yield b
    b.close()


# --- convert --onnx ---
def test_convert_onnx_writes_the_files_and_the_manifest_entry(onnx_convert):
    res, out, secs = onnx_convert
    assert res.exit_code == 0, res.output
    printed = [Path(line) for line in res.stdout.split()]
    assert [p.name for p in printed] == ["tiny-hf-llm-F32.gguf", "tiny-hf-mmproj-F32.gguf", "tiny-hf.manifest.json",
                                         "tiny-hf-vision.onnx", "tiny-hf-vision.json"]
    assert all(p.is_file() for p in printed)
    # the three + two files, the external weights, and nothing else (no temporary leftovers)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in printed] + ["tiny-hf-vision.onnx.data"])
    manifest = json.loads((out / "tiny-hf.manifest.json").read_text())
    assert manifest["onnx"] == {"model": "tiny-hf-vision.onnx", "sidecar": "tiny-hf-vision.json",
                                "data": "tiny-hf-vision.onnx.data"}
    sc = json.loads((out / "tiny-hf-vision.json").read_text())
    assert sc["image_size"] == 56 and sc["n_tokens"] == 16 and sc["n_embd"] == 64 and sc["feature_layer"] == 2
    assert sc["pad_to_square"] is True and sc["resample"] == "bicubic"
    assert len(sc["image_mean"]) == len(sc["image_std"]) == 3
    model_path = out / "tiny-hf-vision.onnx"
    onnx.checker.check_model(str(model_path), full_check=True)
    m = onnx.load(str(model_path), load_external_data=False)
    assert m.opset_import[0].version >= 17
    assert m.graph.initializer and all(t.data_location == t.EXTERNAL for t in m.graph.initializer)
    (inp,), (outp,) = m.graph.input, m.graph.output
    assert inp.name == "pixel_values" and inp.type.tensor_type.shape.dim[0].dim_param   # dynamic batch
    assert outp.name == "image_embeds" and [d.dim_value for d in outp.type.tensor_type.shape.dim[1:]] == [16, 64]
    assert "Erf" in {n.op_type for n in m.graph.node}   # the projector's exact GELU
    print(f"convert --onnx of the tiny model (GGUFs + ONNX): {secs:.2f}s")


# --- fidelity ---
def test_onnx_embeddings_equal_the_pytorch_reference(onnx_backend, tiny_model):
    pixels = preprocess_batch(IMAGES, onnx_backend.preprocess_config)
    ref = reference_image_features(tiny_model, pixels)
    worst1 = max(assert_embeddings_close(onnx_backend.encode([im]), ref[i:i + 1], max_abs=1e-4)
                 for i, im in enumerate(IMAGES))
    worst4 = assert_embeddings_close(onnx_backend.encode(IMAGES), ref, max_abs=1e-4)
    print(f"onnx vs transformers get_image_features: batch 1 max |Δ| = {worst1:.2e}, batch 4 max |Δ| = {worst4:.2e} "
          f"(providers {onnx_backend.providers})")


def test_original_layout_exports_the_same_encoder(tiny_ckpt, tiny_model, onnx_pair, tmp_path):
    """liuhaotian layout (separate CLIP dir, model.mm_projector.0/2) -> the same embeddings."""
    from convert.onnx_export import export_onnx
    _, _, orig_dir, clip_dir = tiny_ckpt
    path = export_onnx(orig_dir, tmp_path, name="orig", vision_tower=clip_dir)
    b = create_backend("onnx", onnx_pair.mmproj, VisionOptions(onnx_path=path))
    pixels = preprocess_batch(IMAGES, b.preprocess_config)
    d = assert_embeddings_close(b.encode_pixels(pixels), reference_image_features(tiny_model, pixels), max_abs=1e-4)
    print(f"original-layout export vs transformers, batch 4: max |Δ| = {d:.2e}")


def test_onnx_encodes_in_batches(onnx_pair):
    """More images than one session.run takes: chunked, same result as one batch."""
    b2 = create_backend("onnx", onnx_pair.mmproj, VisionOptions(batch_size=3))
    b8 = create_backend("onnx", onnx_pair.mmproj, VisionOptions(batch_size=8))
    imgs = IMAGES + IMAGES[:3]
    a, b = b2.encode(imgs), b8.encode(imgs)
    assert a.shape == (7, 16, 64)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_engine_with_onnx_answers_like_torch(onnx_pair):
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.sampling import SamplingParams
    tokens = {}
    for backend in ("torch", "onnx"):
        eng = Engine(onnx_pair, vision_backend=backend, n_ctx=512)
        try:
            ans = eng.ask("Describe the image.", [IMAGES[1]], max_tokens=16, sampling=SamplingParams(temperature=0.0))
        finally:
            eng.close()
        assert ans.timings["vision_backend"] == backend
        tokens[backend] = ans.tokens
    print(f"greedy tokens: torch {tokens['torch']}\n               onnx  {tokens['onnx']}")
    assert len(tokens["onnx"]) == 16 and tokens["onnx"] == tokens["torch"]


# --- finding and matching ---
def test_no_onnx_file_means_backend_unavailable(pair_f32):
    with pytest.raises(BackendUnavailableError, match="no ONNX vision model"):
        create_backend("onnx", pair_f32.mmproj)


def test_sidecar_of_another_model_is_refused(onnx_pair, tmp_path):
    d = _copy_onnx(onnx_pair, tmp_path)
    sc = json.loads((d / "tiny-hf-vision.json").read_text())
    sc["n_embd"] = 96
    (d / "tiny-hf-vision.json").write_text(json.dumps(sc))
    with pytest.raises(ModelFilesError, match=r"tiny-hf-vision\.json.*n_embd 96.*has 64"):
        create_backend("onnx", onnx_pair.mmproj, VisionOptions(onnx_path=d / "tiny-hf-vision.onnx"))


def test_providers_follow_the_vision_device():
    cpu = "CPUExecutionProvider"
    assert choose_providers("cpu", ["CUDAExecutionProvider", cpu]) == [cpu]
    assert choose_providers("gpu", ["CUDAExecutionProvider", cpu]) == ["CUDAExecutionProvider", cpu]
    assert choose_providers("gpu", ["CoreMLExecutionProvider", cpu], platform="darwin") == ["CoreMLExecutionProvider", cpu]
    assert choose_providers("gpu", [cpu]) == [cpu]


# --- export safety ---
@pytest.mark.parametrize("name", ["../escape", "sub/escape", "/tmp/escape"])
def test_export_refuses_to_write_outside_its_folder(tiny_ckpt, tmp_path, name):
    from convert.onnx_export import export_onnx
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="outside the output folder"):
        export_onnx(tiny_ckpt[1], out, name=name)
    assert not out.exists() and sorted(tmp_path.iterdir()) == []
    assert not Path("/tmp/escape-vision.onnx").exists()


def test_export_refuses_a_symlink_leading_out(tiny_ckpt, tmp_path):
    from convert.onnx_export import export_onnx
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "m-vision.onnx.data").symlink_to(elsewhere / "stolen.data")
    with pytest.raises(ConversionError, match="outside the output folder"):
        export_onnx(tiny_ckpt[1], out, name="m")
    assert list(elsewhere.iterdir()) == []


def test_failed_export_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    from convert.onnx_export import export_onnx

    def fail(*a, **k):
        raise onnx.checker.ValidationError("crafted failure")
    monkeypatch.setattr(onnx.checker, "check_model", fail)
    with pytest.raises(ConversionError, match="onnx.checker"):
        export_onnx(tiny_ckpt[1], tmp_path, name="m")
    assert list(tmp_path.iterdir()) == []


# --- crafted external data at load ---
def _copy_onnx(pair, dst: Path) -> Path:
    """The model dir (GGUFs, manifest, ONNX, sidecar, data) copied, so a test can tamper with it."""
    dst = dst / "model"
    shutil.copytree(pair.llm_path.parent, dst)
    return dst


def _point_first_tensor_at(model_path: Path, location: str) -> str:
    m = onnx.load(str(model_path), load_external_data=False)
    t = m.graph.initializer[0]
    for e in t.external_data:
        if e.key == "location":
            e.value = location
        elif e.key == "offset":
            e.value = "0"
    model_path.write_bytes(m.SerializeToString())
    return t.name


@pytest.fixture()
def outside_file(tmp_path) -> Path:
    p = tmp_path / "outside" / "secret.bin"
    p.parent.mkdir()
    p.write_bytes(b"\0" * 1_000_000)
    return p


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_folder_is_refused(onnx_pair, tmp_path, outside_file, kind, monkeypatch):
    d = _copy_onnx(onnx_pair, tmp_path)
    model = d / "tiny-hf-vision.onnx"
    if kind == "absolute":
        loc = str(outside_file)
    elif kind == "dotdot":
        loc = "../outside/secret.bin"
    else:
        (d / "link.bin").symlink_to(outside_file)
        loc = "link.bin"
    tensor = _point_first_tensor_at(model, loc)
    import onnxruntime

    def no_session(*a, **k):
        raise AssertionError("onnxruntime must not see a refused model")
    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    with pytest.raises(ModelFilesError) as exc:
        create_backend("onnx", onnx_pair.mmproj, VisionOptions(onnx_path=model))
    msg = str(exc.value)
    assert str(model) in msg and tensor in msg and "outside the model's folder" in msg


def test_cli_reports_crafted_onnx_as_one_error_line(onnx_pair, tmp_path, outside_file, sample_png):
    d = _copy_onnx(onnx_pair, tmp_path)
    _point_first_tensor_at(d / "tiny-hf-vision.onnx", "../outside/secret.bin")
    res = CliRunner().invoke(main, ["run", "--model", str(d), "--vision-backend", "onnx", "-p", "Hi",
                                    "--max-tokens", "3", str(sample_png)])
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "tiny-hf-vision.onnx" in lines[0]
    assert "outside the model's folder" in lines[0] and "Traceback" not in res.output and res.stdout == ""


def test_cli_run_with_onnx_backend(onnx_pair, sample_png):
    res = CliRunner().invoke(main, ["run", "--model", str(onnx_pair.llm_path.parent), "--vision-backend", "onnx",
                                    "-p", "Hi", "--max-tokens", "3", "--json", str(sample_png)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["timings"]["vision_backend"] == "onnx"
