"""RELIABILITY.md "Model files": crafted bad inputs to `convert` and to loading, each a clear error.

The byte-level GGUF / safetensors cases are exhaustive in test_gguf_check.py and
test_safetensors_check.py; here each class is driven through the real entry points (CLI and
library) to show that the user gets one `Error:` line, exit 1, no traceback and no partial output.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import gguf
import pytest
import torch
from click.testing import CliRunner

from conftest import assert_one_line_error
from llava_local.cli.main import main
from llava_local.errors import ContextOverflowError, ModelFilesError
from llava_local.runtime.model_pair import resolve_pair


def run_cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def copy_pair(pair, dst: Path) -> tuple[Path, Path]:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(pair.llm_path, dst)), Path(shutil.copy(pair.mmproj_path, dst))


# --- GGUF files given to `run` -------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["magic", "10", "mid", "99%"])
def test_truncated_or_foreign_gguf_is_refused_before_llama_cpp(pair_f32, tmp_path, sample_png, cut):
    llm, mm = copy_pair(pair_f32, tmp_path)
    data = llm.read_bytes()
    bad = {"magic": b"GGUX" + data[4:], "10": data[:10], "mid": data[:2000], "99%": data[:int(len(data) * 0.99)]}[cut]
    llm.write_bytes(bad)
    res = run_cli("run", "--model", llm, "--mmproj", mm, "-p", "hi", sample_png)
    assert_one_line_error(res, llm.name, "GGUF")


def test_huge_counts_refused_quickly(pair_f32, tmp_path, sample_png):
    llm, mm = copy_pair(pair_f32, tmp_path)
    data = bytearray(llm.read_bytes())
    struct.pack_into("<Q", data, 8, 2**63)     # n_tensors
    llm.write_bytes(bytes(data))
    res = run_cli("run", "--model", llm, "--mmproj", mm, "-p", "hi", sample_png)
    assert_one_line_error(res, llm.name)


def test_mmproj_width_mismatch_names_both_widths_before_reading_images(pair_f32, other_width_pair, tmp_path):
    not_an_image = tmp_path / "x.jpg"
    not_an_image.write_text("not an image")
    res = run_cli("run", "--model", pair_f32.llm_path, "--mmproj", other_width_pair.mmproj_path, "-p", "hi",
                  not_an_image)
    line = assert_one_line_error(res, "96", "64", "wrong --mmproj")
    assert "x.jpg" not in line


def test_llm_given_as_mmproj_says_which_file_is_which(pair_f32, sample_png):
    res = run_cli("run", "--model", pair_f32.llm_path, "--mmproj", pair_f32.llm_path, "-p", "hi", sample_png)
    assert_one_line_error(res, "not an mmproj", "LLM")


def test_mmproj_given_as_model(pair_f32, sample_png):
    res = run_cli("run", "--model", pair_f32.mmproj_path, "--mmproj", pair_f32.mmproj_path, "-p", "hi", sample_png)
    assert_one_line_error(res, "mmproj (vision) file, not an LLM")


def _rewrite_gguf(src: Path, dst: Path, drop_key: str) -> None:
    """Copy a GGUF without one metadata key (an old-style mmproj)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=str(r.fields["general.architecture"].contents()))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in (drop_key, "general.architecture"):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vtype)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_mmproj_without_projector_type(pair_f32, tmp_path, sample_png):
    bad = tmp_path / "old-mmproj.gguf"
    _rewrite_gguf(pair_f32.mmproj_path, bad, "clip.projector_type")
    res = run_cli("run", "--model", pair_f32.llm_path, "--mmproj", bad, "-p", "hi", sample_png)
    assert_one_line_error(res, bad.name, "clip.projector_type")


def test_context_too_small_for_image_is_refused(pair_f32, sample_png):
    with pytest.raises(ContextOverflowError, match="image needs 16 tokens, n_ctx is 16"):
        from llava_local.runtime.model_pair import check_context
        check_context(pair_f32, 16, n_images=1)
    res = run_cli("run", "--model", pair_f32.llm_path.parent, "-p", "hi", "--ctx", "16", sample_png)
    assert_one_line_error(res, "image needs 16 tokens, n_ctx is 16")


def test_context_too_small_for_two_images_with_prompt(pair_f32, sample_png):
    from llava_local.runtime.engine import Engine
    eng = Engine(pair_f32, vision_backend="torch", n_ctx=40)
    try:
        with pytest.raises(ContextOverflowError, match="2 images need 32 tokens"):
            # llama.cpp may round n_ctx up: fill what it really has
            eng.ask("word " * (eng.llm.n_ctx - 40), [sample_png, sample_png])
        assert eng.n_images_encoded == 0  # refused before encoding: never answers without the image
    finally:
        eng.close()


def test_untrusted_chat_template_in_gguf_is_never_rendered(pair_f32, tmp_path, sample_png):
    """A GGUF whose tokenizer.chat_template tries to escape the sandbox still loads: the runtime uses
    the named template (ours, or the manifest's, else vicuna_v1) and never evaluates GGUF Jinja."""
    llm = tmp_path / "evil-llm.gguf"
    _rewrite_gguf(pair_f32.llm_path, llm, "llava_local.chat_template_name")
    r = gguf.GGUFReader(llm)
    assert "llava_local.chat_template_name" not in r.fields
    evil = tmp_path / "evil2-llm.gguf"
    data = llm.read_bytes()
    old = get_template_jinja()
    payload = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for i in range(10**12) %}x{% endfor %}"
    assert len(payload) <= len(old)
    evil.write_bytes(data.replace(old.encode(), payload.ljust(len(old)).encode()))
    res = run_cli("run", "--model", evil, "--mmproj", pair_f32.mmproj_path, "-p", "hi", "--max-tokens", "2",
                  sample_png)
    assert res.exit_code == 0, res.output


def get_template_jinja() -> str:
    from llava_local.prompts.templates import get_template
    return get_template("vicuna_v1").jinja


# --- checkpoints given to `convert` ----------------------------------------------------------------

class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LLAVA_LOCAL_PWNED']}",))


def test_pickle_payload_in_bin_checkpoint_never_runs(tiny_ckpt, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LLAVA_LOCAL_PWNED", str(marker))
    src = tmp_path / "evil-orig"
    shutil.copytree(tiny_ckpt[2], src)
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, f)
    out = tmp_path / "out"
    res = run_cli("convert", src, "-o", out, "--vision-tower", tiny_ckpt[3])
    assert_one_line_error(res, "pytorch_model.bin", "weights only")
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())


def test_safetensors_huge_header_refused(tiny_ckpt, tmp_path):
    src = tmp_path / "bad-hf"
    shutil.copytree(tiny_ckpt[1], src)
    st = src / "model.safetensors"
    st.write_bytes(struct.pack("<Q", 2**64 - 1) + st.read_bytes()[8:])
    res = run_cli("convert", src, "-o", tmp_path / "out")
    assert_one_line_error(res, "model.safetensors")


def test_safetensors_overlapping_offsets_refused(tiny_ckpt, tmp_path):
    src = tmp_path / "bad-hf"
    shutil.copytree(tiny_ckpt[1], src)
    st = src / "model.safetensors"
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = names[0], names[1]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    header[b]["dtype"], header[b]["shape"] = header[a]["dtype"], header[a]["shape"]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    st.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    res = run_cli("convert", src, "-o", tmp_path / "out")
    assert_one_line_error(res, "model.safetensors")


def test_linear_projector_is_refused_with_reason(tiny_ckpt, tmp_path):
    src = tmp_path / "llava-1.0"
    shutil.copytree(tiny_ckpt[2], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (src / "config.json").write_text(json.dumps(cfg))
    res = run_cli("convert", src, "-o", tmp_path / "out", "--vision-tower", tiny_ckpt[3])
    assert_one_line_error(res, "linear", "mm.2")


def test_original_layout_without_vision_tower(tiny_ckpt, tmp_path):
    src = tmp_path / "orig"
    shutil.copytree(tiny_ckpt[2], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"   # a hub id: never downloaded
    (src / "config.json").write_text(json.dumps(cfg))
    res = run_cli("convert", src, "-o", tmp_path / "out")
    assert_one_line_error(res, "--vision-tower")


def test_not_a_llava_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    torch.save({"x": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    res = run_cli("convert", tmp_path, "-o", tmp_path / "out")
    assert_one_line_error(res, "not a LLaVA checkpoint")


def test_debug_flag_shows_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    res = CliRunner().invoke(main, ["--debug", "convert", str(tmp_path), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and isinstance(res.exception, ModelFilesError)


def test_resolve_pair_from_directory_needs_unambiguous_files(pair_f32, tmp_path):
    llm, mm = copy_pair(pair_f32, tmp_path)
    assert resolve_pair(tmp_path).llm_path == llm
    shutil.copy(llm, tmp_path / "second-llm.gguf")
    with pytest.raises(ModelFilesError, match="exactly one LLM"):
        resolve_pair(tmp_path)
