"""`llava-local run`: one-shot answers, stdout/stderr discipline, and RELIABILITY.md "Images" through the CLI.

The image loader itself is tested case by case in test_images.py; here every bad kind is given to
the real command, which must print one `Error:` line naming the file, exit 1, and load no model.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import random_image
from llava_local.cli.main import main


def run(*args, input=None):
    return CliRunner().invoke(main, ["run", *map(str, args)], input=input)


@pytest.fixture(scope="module")
def model_dir(pair_f32):
    return pair_f32.llm_path.parent


def test_answer_goes_to_stdout_only(model_dir, sample_png):
    res = run("--model", model_dir, "-p", "What is this?", "--max-tokens", "5", sample_png)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() and res.stderr.strip() == ""


def test_json_output_has_timings_and_counts(model_dir, sample_png):
    res = run("--model", model_dir, "-p", "What is this?", "--max-tokens", "5", "--json", sample_png)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["n_tokens"] == 5 and rec["finish_reason"] == "length"
    assert rec["n_prompt_tokens"] > 16 and rec["timings"]["vision_backend"] == "native"   # auto: native first
    assert set(rec["timings"]) >= {"image_load_s", "encode_s", "prefill_s", "decode_s", "decode_tok_per_s"}


def test_prompt_from_stdin_and_greedy_is_deterministic(model_dir, sample_png):
    a = run("--model", model_dir, "-p", "-", "--max-tokens", "6", sample_png, input="Describe it.\n")
    b = run("--model", model_dir, "-p", "Describe it.\n", "--max-tokens", "6", sample_png)
    assert a.exit_code == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("backend", ["torch", "mtmd"])
def test_both_backends_answer(model_dir, sample_png, backend):
    res = run("--model", model_dir, "-p", "Hi", "--max-tokens", "3", "--vision-backend", backend, "--json", sample_png)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["timings"]["vision_backend"] == backend


def test_empty_prompt_is_an_error(model_dir, sample_png):
    res = run("--model", model_dir, "-p", "   ", sample_png)
    assert res.exit_code == 1 and res.stderr.strip() == "Error: empty prompt"


def test_env_var_selects_model(model_dir, sample_png, monkeypatch):
    res = CliRunner().invoke(main, ["run", "-p", "Hi", "--max-tokens", "2", str(sample_png)],
                             env={"LLAVA_LOCAL_MODEL": str(model_dir)})
    assert res.exit_code == 0, res.output


# --- bad images -------------------------------------------------------------------------------------

def _png_with_size(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 16  # after the 8-byte signature and the chunk length + type
    struct.pack_into(">II", data, ihdr, w, h)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    struct.pack_into(">I", data, 29, crc)
    return bytes(data)


def _bad_images(d: Path) -> dict[str, Path]:
    out = {}
    (d / "empty.jpg").write_bytes(b"")
    out["empty"] = d / "empty.jpg"
    (d / "text.jpg").write_text("hello, I am not a JPEG")
    out["text"] = d / "text.jpg"
    (d / "dir.jpg").mkdir()
    out["directory"] = d / "dir.jpg"
    out["missing"] = d / "missing.png"
    buf = io.BytesIO()
    random_image(64, 64).save(buf, format="JPEG")
    (d / "half.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated jpeg"] = d / "half.jpg"
    buf = io.BytesIO()
    random_image(64, 64).save(buf, format="PNG")
    (d / "half.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated png"] = d / "half.png"
    (d / "bomb.png").write_bytes(_png_with_size(20000, 10000))
    out["bomb 20000x10000"] = d / "bomb.png"
    (d / "bomb2.png").write_bytes(_png_with_size(10000, 10000))
    out["bomb 10000x10000"] = d / "bomb2.png"
    random_image(16, 16).save(d / "img.tiff")
    out["tiff"] = d / "img.tiff"
    return out


@pytest.mark.parametrize("kind", ["empty", "text", "directory", "missing", "truncated jpeg", "truncated png",
                                  "bomb 20000x10000", "bomb 10000x10000", "tiff"])
def test_bad_image_is_one_clear_line(model_dir, tmp_path, kind):
    path = _bad_images(tmp_path)[kind]
    res = run("--model", model_dir, "-p", "What is this?", path)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and path.name in lines[0], res.stderr
    assert res.stdout == ""


def _odd_images(d: Path) -> dict[str, Path]:
    out = {}
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    out["1x1"] = d / "one.png"
    Image.new("RGB", (10000, 20), (10, 200, 10)).save(d / "wide.png")
    out["10000x20"] = d / "wide.png"
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.save(d / "alpha.png")
    out["rgba"] = d / "alpha.png"
    g16 = Image.fromarray(np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (16, 1)))
    g16.save(d / "g16.png")
    out["16-bit"] = d / "g16.png"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    out["cmyk"] = d / "cmyk.jpg"
    frames = [Image.new("P", (16, 16), i) for i in range(50)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    out["animated gif"] = d / "anim.gif"
    img = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(d / "rot.jpg", exif=exif)
    out["exif 6"] = d / "rot.jpg"
    return out


@pytest.mark.parametrize("kind", ["1x1", "10000x20", "rgba", "16-bit", "cmyk", "animated gif", "exif 6"])
def test_unusual_but_valid_images_get_answers(model_dir, tmp_path, kind):
    path = _odd_images(tmp_path)[kind]
    res = run("--model", model_dir, "-p", "What is this?", "--max-tokens", "2", "--json", path)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_prompt_tokens"] > 16
