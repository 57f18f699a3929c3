"""`llava-local convert` on both checkpoint layouts: what it writes, and that llama.cpp reads it."""
from __future__ import annotations

import base64
import io
import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from jinja2.sandbox import ImmutableSandboxedEnvironment

from conftest import random_image
from llava_local.cli.main import main
from llava_local.formats.gguf_check import read_gguf_info
from llava_local.prompts.templates import Message, get_template


def _cli_convert(args):
    res = CliRunner().invoke(main, ["convert", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return [line for line in res.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli_outputs(tiny_ckpt, tmp_path_factory):
    _, hf, orig, clip = tiny_ckpt
    out_hf = tmp_path_factory.mktemp("cli-hf")
    out_orig = tmp_path_factory.mktemp("cli-orig")
    a = _cli_convert([str(hf), "-o", str(out_hf), "--outtype", "f32"])
    # the original layout finds its CLIP through mm_vision_tower in config.json; --vision-tower also works
    b = _cli_convert([str(orig), "-o", str(out_orig), "--outtype", "f32", "--vision-tower", str(clip)])
    return out_hf, out_orig, a, b


def _tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: np.array(t.data) for t in r.tensors}


def test_cli_writes_named_pair_and_manifest(cli_outputs):
    out_hf, _, printed, _ = cli_outputs
    names = sorted(p.split("/")[-1] for p in printed)
    assert names == ["tiny-hf-llm-F32.gguf", "tiny-hf-mmproj-F32.gguf", "tiny-hf.manifest.json"]
    m = json.loads((out_hf / "tiny-hf.manifest.json").read_text())
    assert m["template"] == "vicuna_v1" and m["image_tokens"] == 16 and m["source"]["layout"] == "llava-hf"
    assert m["versions"]["gguf"] and m["llm"] == "tiny-hf-llm-F32.gguf"


def test_mmproj_metadata_is_llama_cpp_clip_format(cli_outputs):
    info = read_gguf_info(cli_outputs[0] / "tiny-hf-mmproj-F32.gguf")
    md = info.metadata
    assert md["general.architecture"] == "clip"
    assert md["clip.projector_type"] == "mlp"
    assert md["clip.has_llava_projector"] is True and md["clip.has_vision_encoder"] is True
    assert md["clip.vision.feature_layer"] == [2]          # "layer -2" of 3, written explicitly
    assert md["clip.vision.block_count"] == 2              # only the layers that run are stored
    assert not any(n.startswith("v.post_ln") for n in info.tensors)
    assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.class_embd"} <= set(info.tensors)


def test_llm_has_template_and_tokenizer(cli_outputs):
    info = read_gguf_info(cli_outputs[0] / "tiny-hf-llm-F32.gguf")
    md = info.metadata
    assert md["general.architecture"] == "llama"
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
    assert md["tokenizer.chat_template"] == get_template("vicuna_v1").jinja


def test_both_layouts_convert_to_identical_tensors(cli_outputs):
    out_hf, out_orig, _, _ = cli_outputs
    for kind in ("llm", "mmproj"):
        a = _tensors(out_hf / f"tiny-hf-{kind}-F32.gguf")
        b = _tensors(out_orig / f"tiny-orig-{kind}-F32.gguf")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_jinja_template_renders_like_the_named_template():
    t = get_template("vicuna_v1")
    msgs = [Message("user", "<image>\nWhat is it?"), Message("assistant", "A cat."), Message("user", "Sure?")]
    env = ImmutableSandboxedEnvironment()
    rendered = env.from_string(t.jinja).render(messages=[m.__dict__ for m in msgs], bos_token="", eos_token="</s>")
    assert rendered == t.render(msgs, add_generation_prompt=True)
    assert rendered.endswith("USER: Sure? ASSISTANT:") and "ASSISTANT: A cat.</s>USER:" in rendered


def test_llama_cpp_tokenizer_matches_transformers(pair_f32, tiny_ckpt):
    from transformers import AutoTokenizer

    from llava_local.runtime.llm import LlamaLLM
    hf = AutoTokenizer.from_pretrained(str(tiny_ckpt[1]))
    llm = LlamaLLM(pair_f32.llm_path, n_ctx=64)
    try:
        for text in ["Hello world!", "  two  spaces\nand a newline", "It's 2024: 12.5% of 3333 cats 🦙",
                     "USER: <|im_end|> ASSISTANT:", "ÀÉÎ 你好 <b>tag</b>"]:
            assert llm.tokenize(text) == hf(text, add_special_tokens=False).input_ids, text
    finally:
        llm.close()


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_half_precision_outputs_load_and_answer(tiny_ckpt, tmp_path, outtype):
    from convert import convert
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.model_pair import resolve_pair
    r = convert(tiny_ckpt[1], tmp_path, outtype=outtype)
    eng = Engine(resolve_pair(tmp_path), vision_backend="mtmd", n_ctx=256)
    try:
        ans = eng.ask("Describe.", [random_image(30, 30)], max_tokens=4)
        assert len(ans.tokens) == 4
    finally:
        eng.close()
    assert r.manifest["outtype"] == outtype


def test_pair_loads_in_llama_cpp_python_multimodal_path(pair_f32):
    """llama-cpp-python's own LLaVA path (Llava15ChatHandler over libmtmd) accepts our files."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler
    buf = io.BytesIO()
    random_image(64, 48).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = Llava15ChatHandler(clip_model_path=str(pair_f32.mmproj_path), verbose=False)
    llm = Llama(model_path=str(pair_f32.llm_path), chat_handler=handler, n_ctx=256, verbose=False)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is this?"}]}],
        max_tokens=4, temperature=0.0)
    assert out["usage"]["prompt_tokens"] >= 16       # the 16 image tokens were evaluated
    assert out["usage"]["completion_tokens"] >= 1
