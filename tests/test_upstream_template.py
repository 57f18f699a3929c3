"""Our LLM GGUFs' chat template is one that upstream llama.cpp recognises, so its tools run them with no
flags: checked through llama.cpp's own C API (the template detection behind `llama-mtmd-cli`), on the
shipped demo model and on freshly converted (and quantized) tiny models. Our own Jinja rendering of the
template must stay LLaVA's vicuna_v1 layout exactly.
"""
from __future__ import annotations

import ctypes
import re
import shutil
from pathlib import Path

import gguf
import pytest

from convert.retemplate import retemplate
from llava_local.prompts.render import JinjaFormat, NamedFormat, choose_format
from llava_local.prompts.templates import VICUNA_SYSTEM, Message, get_template

DEMO_LLM = Path(__file__).resolve().parents[1] / "llava_local" / "data" / "demo" / "shapes-demo-llm-Q8_0.gguf"

CONVERSATION = [("user", "<image>\nWhat colour is the circle?"), ("assistant", "Red."),
                ("user", "And the square?")]

# LLaVA-1.5 conv_vicuna_v1, as our renderer and `--jinja` must produce it
LLAVA_LAYOUT = ("<s>" + VICUNA_SYSTEM + " USER: <image>\nWhat colour is the circle? ASSISTANT: Red.</s>"
                "USER: And the square? ASSISTANT:")
# llama.cpp's built-in "vicuna" (llama-chat.cpp): no default system prompt, each turn ends with "\n",
# the BOS is added by the tokenizer, not the template
LLAMA_CPP_VICUNA = ("USER: <image>\nWhat colour is the circle?\nASSISTANT: Red.</s>\n"
                    "USER: And the square?\nASSISTANT:")


def _gguf_template(path: Path) -> str:
    """The template as llama.cpp reads it: `llama_model_chat_template` of a vocab-only load."""
    from llava_local.llama_lib import llama_cpp_lib
    L = llama_cpp_lib()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        tmpl = L.llama_model_chat_template(model, None)
        assert tmpl is not None, f"{path}: llama.cpp finds no chat template"
        return tmpl.decode()
    finally:
        L.llama_model_free(model)


def llama_cpp_apply(template: str, conversation, *, add_ass: bool = True) -> str | None:
    """llama.cpp's non-Jinja path: None when it does not recognise the template (what makes
    llama-mtmd-cli abort with "this custom template is not supported, try using --jinja")."""
    from llava_local.llama_lib import llama_cpp_lib
    L = llama_cpp_lib()
    keep = [(r.encode(), c.encode()) for r, c in conversation]
    msgs = (L.llama_chat_message * len(keep))(*[L.llama_chat_message(r, c) for r, c in keep])
    size = 4096
    buf = ctypes.create_string_buffer(size)
    n = L.llama_chat_apply_template(template.encode(), msgs, len(keep), add_ass, buf, size)
    if n < 0:
        return None
    assert n <= size, n
    return buf.raw[:n].decode()


def test_our_jinja_renders_llava_layout_exactly():
    msgs = [Message(r, c) for r, c in CONVERSATION]
    jinja = JinjaFormat(get_template("vicuna_v1").jinja, bos_text="<s>", eos_text="</s>")
    assert jinja.render(msgs, add_generation_prompt=True) == LLAVA_LAYOUT
    named = NamedFormat(get_template("vicuna_v1"), bos_text="<s>", eos_text="</s>")
    assert named.render(msgs, add_generation_prompt=True) == LLAVA_LAYOUT
    with_system = [Message("system", "Be brief.")] + msgs
    assert jinja.render(with_system, add_generation_prompt=True) == LLAVA_LAYOUT.replace(VICUNA_SYSTEM, "Be brief.")


def test_runtime_still_recognises_its_own_template():
    fmt = choose_format(override=None, gguf_template=get_template("vicuna_v1").jinja, named="vicuna_v1",
                        bos_text="<s>", eos_text="</s>")
    assert isinstance(fmt, NamedFormat) and fmt.name == "vicuna_v1"
    # files converted before the detection comment hold the same template without it: still ours
    old = get_template("vicuna_v1").jinja.split("#}", 1)[1]
    fmt = choose_format(override=None, gguf_template=old, named="vicuna_v1", bos_text="<s>", eos_text="</s>")
    assert isinstance(fmt, NamedFormat) and fmt.name == "vicuna_v1"


def test_detection_comes_from_the_comment():
    """Without its leading comment our template is not recognised (the bug this fixes), with it it is,
    and as plain Vicuna: "SYSTEM: " anywhere would select Orca-Vicuna, which prefixes the system prompt."""
    tmpl = get_template("vicuna_v1").jinja
    assert tmpl.startswith("{#") and "SYSTEM: " not in tmpl
    bare = re.sub(r"^\{#.*?#\}", "", tmpl)
    assert bare != tmpl and llama_cpp_apply(bare, CONVERSATION) is None
    assert llama_cpp_apply(tmpl, CONVERSATION) == LLAMA_CPP_VICUNA
    assert llama_cpp_apply(tmpl, [("system", "Be brief.")] + CONVERSATION) == "Be brief.\n\n" + LLAMA_CPP_VICUNA


@pytest.fixture(scope="module")
def quantized_q8(converted_f32, tmp_path_factory):
    """The demo build's path: convert to F32, then quantize the LLM to Q8_0 with llama.cpp's quantizer."""
    from convert.quantize import quantize
    return quantize(converted_f32.llm_path, tmp_path_factory.mktemp("q8") / "tiny-llm-Q8_0.gguf", "Q8_0")


@pytest.mark.parametrize("which", ["demo", "converted_f32", "quantized_q8"])
def test_llama_cpp_detects_vicuna_in_our_files(which, request):
    path = DEMO_LLM if which == "demo" else request.getfixturevalue(which)
    path = getattr(path, "llm_path", path)
    tmpl = _gguf_template(path)
    assert tmpl == get_template("vicuna_v1").jinja, f"{path.name} has an old template: make retemplate-demo"
    assert llama_cpp_apply(tmpl, CONVERSATION) == LLAMA_CPP_VICUNA


def _fields_and_tensors(path: Path) -> tuple[dict, dict]:
    """Every metadata record as (types, raw value bytes), in file order, and every tensor's type, shape and bytes."""
    r = gguf.GGUFReader(path)
    fields = {k: (f.types, b"".join(f.parts[i].tobytes() for i in f.data)) for k, f in r.fields.items()
              if not k.startswith("GGUF.")}
    tensors = {t.name: (int(t.tensor_type), t.shape.tolist(), t.data.tobytes()) for t in r.tensors}
    return fields, tensors


def test_retemplate_changes_only_the_template(tmp_path):
    """On the demo LLM (written by llama.cpp's quantizer, Q8_0 blocks): every other record and every
    tensor byte survive a change of template, and changing it back restores the file byte for byte."""
    other = tmp_path / "plain.gguf"
    assert retemplate(DEMO_LLM, other, template="plain")
    f_src, t_src = _fields_and_tensors(DEMO_LLM)
    f_other, t_other = _fields_and_tensors(other)
    assert f_other.pop("tokenizer.chat_template")[1] == get_template("plain").jinja.encode()
    assert f_src.pop("tokenizer.chat_template")[1] == get_template("vicuna_v1").jinja.encode()
    assert f_other == f_src and list(f_other) == list(f_src)     # same values, same order
    assert t_other == t_src
    assert _gguf_template(other) == get_template("plain").jinja   # llama.cpp reads the spliced file
    # back to the template the file names (vicuna_v1)
    assert retemplate(other)
    assert other.read_bytes() == DEMO_LLM.read_bytes()
    assert not retemplate(other)                                 # already current: nothing written
    assert [p.name for p in tmp_path.iterdir()] == ["plain.gguf"]  # no temporary left behind


def test_retemplate_adds_a_missing_template(tmp_path):
    """A GGUF without any chat template gets one (the header's key count grows), tensors untouched."""
    import numpy as np
    bare = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(bare, "llama")
    w.add_name("bare")
    w.add_tensor("a", np.arange(40, dtype=np.float32).reshape(5, 8))
    w.add_tensor("b", np.ones(3, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "with.gguf"
    assert retemplate(bare, out)
    r = gguf.GGUFReader(out)
    assert r.get_field("tokenizer.chat_template").contents() == get_template("vicuna_v1").jinja
    assert int(r.fields["GGUF.kv_count"].parts[0][0]) == len(gguf.GGUFReader(bare).fields) - 3 + 1
    assert r.get_field("general.name").contents() == "bare"
    assert [t.name for t in r.tensors] == ["a", "b"]
    np.testing.assert_array_equal(r.tensors[0].data, np.arange(40, dtype=np.float32).reshape(5, 8))
    np.testing.assert_array_equal(r.tensors[1].data, np.ones(3, dtype=np.float32))


def test_demo_llm_template_is_current(tmp_path):
    """`make retemplate-demo` has been run on the shipped file: it is a no-op now."""
    copy = tmp_path / DEMO_LLM.name
    shutil.copy(DEMO_LLM, copy)
    assert not retemplate(copy)


def test_retemplate_refuses_an_mmproj(converted_f32, tmp_path):
    from llava_local.errors import ConversionError
    with pytest.raises(ConversionError, match="mmproj"):
        retemplate(converted_f32.mmproj_path, tmp_path / "x.gguf")


def test_retemplate_refuses_truncated_and_missing_files_in_one_line(tmp_path):
    import subprocess
    import sys
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(DEMO_LLM.read_bytes()[:100])
    for path, why in ((bad, "incomplete or not a GGUF file"), (tmp_path / "absent.gguf", "cannot open GGUF file")):
        p = subprocess.run([sys.executable, "-m", "convert.retemplate", str(path)], capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.startswith(f"Error: {path}: ") and why in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
