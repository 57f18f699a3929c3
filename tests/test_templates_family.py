"""The LLaVA family's other LLMs and their chat templates: Llama-3 (LLaVA-NeXT llama3-llava), ChatML
(LLaVA-1.6-34B, a Yi SentencePiece vocabulary) and Mistral (LLaVA-1.6-Mistral), on tiny random LLaVA
checkpoints with tokenizers of each kind (train/tiny_tokenizers.py).

- The converter picks the template from the checkpoint (convert/template_choice.py), writes its Jinja,
  and upstream llama.cpp recognises it (its built-in layout of the same family).
- Our prompt builder, through the converted GGUF's llama.cpp tokenizer (the runtime Engine's), gives
  the token ids of the LLaVA repo's layout written below as literal strings, tokenized as the LLaVA repo
  does (`tokenizer_image_token`: each text chunk around "<image>" through the transformers tokenizer).
- Each template's Jinja renders what Template.render does; llama.cpp's tokenizer of each converted
  vocabulary tokenizes as transformers does (SentencePiece scores, space prefix, Llama-3's split).
"""
from __future__ import annotations

import dataclasses
import logging
import struct

import gguf
import numpy as np
import pytest

from convert import convert
from convert.checkpoint import _text_fields, read_checkpoint
from convert.tokenizer_gguf import _spm_scores_from_merges
from convert.template_choice import choose_template, resolve_template
from llava_local.errors import ConversionError
from llava_local.prompts.render import JinjaFormat, NamedFormat
from llava_local.prompts.templates import TEMPLATES, Message, get_template, tokenize_segments
from llava_local.prompts.turns import PromptBuilder, answer_span, user_content
from test_upstream_template import _gguf_template, llama_cpp_apply
from train.tiny_models import TinySpec, build_tiny_llava, save_original_layout
from train.tiny_tokenizers import CHATML_SPECIALS, llama3_tokenizer_dir, spm_tokenizer_dir
from train.tokenizer import load_tokenizer

IMAGE = -200   # the LLaVA repo's IMAGE_TOKEN_INDEX, where tokenizer_image_token puts an image
QUESTION, ANSWER, FOLLOW_UP = "What colour is the circle?", "Red.", "And the square?"

# The LLaVA repo's prompts for [user "<image>\nQ", assistant "Red.", user "And the square?"] + the
# generation prompt, as its conversation templates write them (llava/conversation.py):
LLAVA_LAYOUTS = {
    # LLaVA-NeXT conv_llava_llama_3: Llama-3-Instruct's chat template over [system, user, assistant, user].
    # Its rendering starts with the text "<|begin_of_text|>", which tokenizer_image_token then tokenizes
    # with a tokenizer that adds that BOS too (two BOS at inference); LLaVA-NeXT's training tokenization
    # (preprocess_llama3) has one, so the layout is written here without it and the tokenizer adds it.
    "llama_3": ("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
                "You are able to understand the visual content that the user provides, and assist the user with "
                "a variety of tasks using natural language.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the circle?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nAnd the square?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    # conv_chatml_direct (SeparatorStyle.MPT): no newline after <|im_end|>; Yi adds no BOS
    "chatml_direct": ("<|im_start|>system\nAnswer the questions.<|im_end|>"
                      "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>"
                      "<|im_start|>assistant\nRed.<|im_end|>"
                      "<|im_start|>user\nAnd the square?<|im_end|><|im_start|>assistant\n"),
    # conv_mistral_instruct (SeparatorStyle.LLAMA_2, sep "", sep2 "</s>"); the tokenizer adds "<s>"
    "mistral_instruct": "[INST] <image>\nWhat colour is the circle? [/INST] Red. </s>[INST] And the square? [/INST]",
}
# upstream llama.cpp's built-in layout for each (llama_chat_apply_template, what its tools use without
# --jinja): recognised as llama3, chatml and llama2-sys
LLAMA_CPP_LAYOUTS = {
    "llama_3": ("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the circle?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nAnd the square?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml_direct": ("<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n"
                      "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>user\nAnd the square?<|im_end|>\n"
                      "<|im_start|>assistant\n"),
    "mistral_instruct": "[INST] <image>\nWhat colour is the circle? [/INST]Red.</s>[INST] And the square? [/INST]",
}
# texts whose tokenization depends on the details the converter must carry over: scores (" Hello
# world"), space prefixes (leading, doubled, after a special token), bytes, digits, contractions
TRICKY_TEXTS = [" Hello world", "Hello  world", "\nWhat colour is the circle? [/INST] Red. </s>[INST] And?",
                "<|im_start|>user\nIt's 2024!<|im_end|>", "ünïcödé 🦙", "the cats' 12.5 lives", "   ", "a"]


def _tokenizer(family: str, root):
    if family == "llama_3":
        return llama3_tokenizer_dir(root / "tok")
    if family == "chatml_direct":
        return spm_tokenizer_dir(root / "tok", space_prefix=False, add_bos=False, specials=CHATML_SPECIALS)
    return spm_tokenizer_dir(root / "tok")


@pytest.fixture(scope="module")
def build_family(tmp_path_factory):
    """name -> (template name, checkpoint dir, ConvertResult, transformers model) of a tiny LLaVA with
    that family's LLM and tokenizer, built and converted once."""
    built = {}

    def get(name: str):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            spec = TinySpec(tokenizer_dir=_tokenizer(name, root), text_layers=1,
                            text_model_type="mistral" if name == "mistral_instruct" else "llama")
            model = build_tiny_llava(root / "ckpt", spec)
            built[name] = name, root / "ckpt", convert(root / "ckpt", root / "out", outtype="f32"), model
        return built[name]
    return get


@pytest.fixture(scope="module", params=list(LLAVA_LAYOUTS))
def family(request, build_family):
    return build_family(request.param)


@pytest.fixture(scope="module")
def engine(family):
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.model_pair import resolve_pair
    eng = Engine(resolve_pair(family[2].llm_path.parent), n_ctx=512, threads=1, vision_backend="torch")
    yield eng
    eng.close()


def llava_tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """The LLaVA repo's mm_utils.tokenizer_image_token: each chunk around "<image>" through the
    tokenizer (which may add its BOS), one BOS kept at the start, IMAGE between the chunks."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        ids += ([IMAGE] if i else []) + chunk[offset:]
    return ids


def test_converter_picks_writes_and_llama_cpp_recognises_the_template(family):
    name, _, result, _ = family
    assert result.manifest["template"] == name
    jinja = _gguf_template(result.llm_path)          # as llama.cpp reads it from the file
    assert jinja == get_template(name).jinja
    conversation = [("user", "<image>\n" + QUESTION), ("assistant", ANSWER), ("user", FOLLOW_UP)]
    assert llama_cpp_apply(jinja, conversation) == LLAMA_CPP_LAYOUTS[name]


def test_prompt_ids_equal_the_llava_layout(family, engine):
    """The runtime's prompt (template from the GGUF, llama.cpp's tokenizer, the one BOS rule) = the LLaVA
    repo's layout through the transformers tokenizer, token for token, the image in the same place."""
    from transformers import AutoTokenizer
    name, ckpt, _, _ = family
    assert engine.format.name == name             # the GGUF's template is recognised as the named one
    messages = [Message("user", user_content(QUESTION, n_images=1)), Message("assistant", ANSWER),
                Message("user", FOLLOW_UP)]
    before, after = engine.prompt.parts(messages, n_images=1)
    expected = llava_tokenizer_image_token(LLAVA_LAYOUTS[name], AutoTokenizer.from_pretrained(ckpt))
    assert before + [IMAGE] + after == expected
    assert len(before) > 3 and len(after) > 10
    if name != "mistral_instruct":
        # train/ tokenizes the same template's segments one by one: the same ids. (A SentencePiece
        # vocabulary that prepends a space gets one more "▁" before each answer that way.)
        tok = load_tokenizer(ckpt)
        conv = tokenize_segments(get_template(name).segments(messages, add_generation_prompt=True),
                                 tok.encode, tok.bos_id, tok.eos_id)
        assert [i for item in conv.items for i in (item if isinstance(item, list) else [IMAGE])] == expected


def test_llama_cpp_tokenizes_each_vocabulary_as_transformers(family, engine):
    from tokenizers import Tokenizer
    name, ckpt, result, _ = family
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for text in TRICKY_TEXTS:
        assert engine.llm.tokenize(text) == hf.encode(text, add_special_tokens=False).ids, (name, text)
    expected_pre = {"llama_3": "llama-bpe"}.get(name)        # SentencePiece vocabularies have none
    assert result.manifest["tokenizer"]["pre"] == expected_pre
    space_prefix = gguf.GGUFReader(result.llm_path).get_field(gguf.Keys.Tokenizer.ADD_PREFIX)
    if name == "llama_3":
        assert space_prefix is None
    else:   # Mistral's SentencePiece prepends a space, Yi's does not
        assert bool(space_prefix.contents()) == (name == "mistral_instruct")


def test_mistral_llm_runs_as_transformers(build_family):
    """The Mistral LLM converted as llama.cpp's llama architecture: last-position logits equal
    transformers' (text only, F32)."""
    import torch
    from llava_local.runtime.llm import LlamaLLM
    _, _, result, model = build_family("mistral_instruct")
    ids = [1, 50, 61, 70, 80, 90, 100, 200, 300, 398]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    llm = LlamaLLM(result.llm_path, n_ctx=64, n_threads=1, precise=True)
    try:
        llm.eval_tokens(ids)
        got = llm.last_logits()
    finally:
        llm.close()
    assert float(np.abs(got[:ref.shape[0]] - ref).max()) < 1e-3


@pytest.mark.parametrize("name", ["vicuna_v1", "mistral_instruct", "llama_3", "chatml_direct"])
def test_jinja_renders_the_template_and_turns_extend(name):
    """The GGUF's Jinja (sandboxed, as the runtime runs a foreign template) = Template.render, with the
    default system prompt and with one given; an answer extends the prompt (KV cache reuse) and ends
    with the family's end of turn."""
    t = get_template(name)
    conversation = [Message("user", "<image>\n" + QUESTION), Message("assistant", ANSWER), Message("user", FOLLOW_UP)]
    # chatml_direct's Jinja writes no BOS (Yi adds none; where a vocabulary does, the tokenizer adds it)
    for msgs in (conversation, [Message("system", "Say 'yes'.")] + conversation):
        for bos in ("",) if name == "chatml_direct" else ("<s>", ""):
            named = NamedFormat(t, bos, "</s>").render(msgs, add_generation_prompt=True)
            assert JinjaFormat(t.jinja, bos, "</s>").render(msgs, add_generation_prompt=True) == named
            assert named.count("<image>") == 1 and ("Say 'yes'." in named) == (msgs[0].role == "system")
    builder = PromptBuilder(NamedFormat(t, "<s>", "</s>"), tokenize=lambda s: [], bos_id=None)
    end = {"vicuna_v1": "</s>", "mistral_instruct": " </s>", "llama_3": "<|eot_id|>", "chatml_direct": "<|im_end|>"}
    assert answer_span(builder, conversation[:1], ANSWER) == ((" " if t.answer_prefix else "") + ANSWER, end[name])


def test_training_segments_end_each_answer_with_the_family_end_of_turn():
    """train/ tokenizes Template.segments: a Llama-3 or ChatML answer is closed by its end-of-turn token
    text (trained on), a Vicuna or Mistral one by the tokenizer's EOS."""
    msgs = [Message("user", "<image>\n" + QUESTION), Message("assistant", ANSWER)]
    targets = {n: [s for s in TEMPLATES[n].segments(msgs) if s.target] for n in LLAVA_LAYOUTS}
    assert [(s.text, s.eos) for s in targets["llama_3"]] == [("Red.<|eot_id|>", False)]
    assert [(s.text, s.eos) for s in targets["chatml_direct"]] == [("Red.<|im_end|>", False)]
    assert [(s.text, s.eos) for s in targets["mistral_instruct"]] == [(" Red. ", True)]


def test_template_choice_rules(family, tiny_ckpt, tmp_path, caplog):
    """convert/template_choice.py: the checkpoint's own chat template first (BakLLaVA: a Mistral LLM
    trained in the Vicuna layout), then the LLM; nothing known is vicuna_v1 with a warning."""
    name, ckpt, _, _ = family
    ck = read_checkpoint(ckpt)
    assert choose_template(ck).name == name
    (tmp_path / "chat_template.json").write_text('{"chat_template": "{% if add_generation_prompt %}ASSISTANT:{% endif %}"}')
    assert choose_template(dataclasses.replace(ck, source=tmp_path)).name == "vicuna_v1"
    ours = tmp_path / "ours"     # one of our own templates (e.g. written by a training run): that one
    ours.mkdir()
    (ours / "chat_template.jinja").write_text(get_template("plain").jinja)
    assert choose_template(dataclasses.replace(ck, source=ours)).name == "plain"
    if name == "mistral_instruct":   # the same SentencePiece vocabulary under a Llama LLM: Vicuna's kind
        choice = choose_template(dataclasses.replace(ck, text={**ck.text, "model_type": "llama"}))
        assert choice.name == "vicuna_v1" and choice.reason.startswith("rule 5")
    # SmolLM2's byte-level vocabulary (our tiny models, the demo) names no family: rule 6, warned
    smol = read_checkpoint(tiny_ckpt[1])
    with caplog.at_level(logging.WARNING, logger="convert.template_choice"):
        assert resolve_template(smol, None) == "vicuna_v1"
        assert resolve_template(smol, "llama_3") == "llama_3"     # --template wins, silently
    warned = [r.getMessage() for r in caplog.records if r.name == "convert.template_choice"]
    assert len(warned) == 1 and "rule 6" in warned[0] and "--template" in warned[0]


def test_mistral_original_layout_converts_alike(build_family, tmp_path):
    """The liuhaotian layout of the same model (LlavaMistralForCausalLM, model_type llava_mistral):
    the same template and the same LLM tensors."""
    _, ckpt, result, model = build_family("mistral_instruct")
    save_original_layout(model, tmp_path / "orig", tmp_path / "clip", tokenizer_dir=ckpt)
    orig = convert(tmp_path / "orig", tmp_path / "out", outtype="f32")
    assert orig.manifest["template"] == "mistral_instruct"
    a, b = gguf.GGUFReader(result.llm_path), gguf.GGUFReader(orig.llm_path)
    assert {t.name: t.data.tobytes() for t in a.tensors} == {t.name: t.data.tobytes() for t in b.tensors}


def test_sliding_window_attention_is_refused(tmp_path):
    """Mistral-7B-v0.1's sliding window cannot run in llama.cpp's llama graph: a clear error naming both
    numbers, not a file that answers differently past the window."""
    with pytest.raises(ConversionError, match=r"sliding_window 4096 < max_position_embeddings 32768"):
        _text_fields({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768,
                      "hidden_size": 64})
    assert _text_fields({"model_type": "mistral", "sliding_window": None, "max_position_embeddings": 32768})
    with pytest.raises(ConversionError, match=r"sliding_window 4096"):   # no key: transformers' default window
        _text_fields({"model_type": "mistral", "max_position_embeddings": 32768})
    build_tiny_llava(tmp_path / "swa", TinySpec(text_model_type="mistral", sliding_window=1024, text_layers=1,
                                                tokenizer_dir=spm_tokenizer_dir(tmp_path / "tok")))
    with pytest.raises(ConversionError, match=r"sliding_window 1024 < max_position_embeddings 2048"):
        convert(tmp_path / "swa", tmp_path / "out", outtype="f32")
    assert not (tmp_path / "out").exists()          # refused while reading, before any file is written


@pytest.mark.slow
def test_upstream_mtmd_cli_runs_each_family_as_we_render_it(family, tmp_path):
    """Upstream `llama-mtmd-cli` (make upstream-tools) runs each pair with no flags (its built-in layout of
    the detected family: no "custom template is not supported" abort), and with --jinja its own Jinja
    engine renders our template exactly as Template.render does (mtmd-cli glues its image marker to the
    question; llama.cpp drops a leading BOS text, which its tokenizer adds)."""
    import re

    from conftest import random_image
    from test_upstream_tools import MEDIA, mtmd_cli
    name, _, result, _ = family
    image = tmp_path / "image.png"
    random_image(80, 60, seed=5).save(image)
    mtmd_cli(result.llm_path, result.mmproj_path, image, QUESTION, n_predict=4)
    # llama.cpp logs from a thread of its own and can exit before it has written its last lines (seen
    # once, in a CI run on a loaded 2-core machine): the run is repeated, at most 3 times, until the log
    # holds the rendered prompt
    for _ in range(3):
        proc = mtmd_cli(result.llm_path, result.mmproj_path, image, QUESTION, n_predict=1, extra=["--jinja", "-v"])
        rendered = re.search(r"formatted_chat\.prompt: (.*?)\n\d+\.\d+\.\d+\.\d+ [A-Z] ", proc.stderr, re.DOTALL)
        if rendered:
            break
    assert rendered, proc.stderr[-2000:]
    ours = NamedFormat(get_template(name), "", "</s>").render([Message("user", MEDIA + QUESTION)],
                                                             add_generation_prompt=True)
    assert rendered.group(1) == ours


def _proto(number: int, value) -> bytes:
    """One protobuf field: a varint (int), a fixed32 float, or length-delimited bytes."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out
    if isinstance(value, float):
        return varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def _write_sentencepiece_model(tokenizer_dir, out_dir) -> None:
    """The tokenizer.model a SentencePiece BPE model of the same vocabulary would have (pieces with
    their types and scores, BPE, add_dummy_prefix as the tokenizer.json's normalizer says), with the
    tokenizer_config.json beside it and no tokenizer.json: the original LLaVA checkpoints' layout."""
    import json
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    by_id = sorted({**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}.items(),
                   key=lambda kv: kv[1])
    texts = [t for t, _ in by_id]
    scores = _spm_scores_from_merges(tj, [t.encode() for t in texts])
    kinds = {"<unk>": 2, **{t["content"]: 3 for t in tj["added_tokens"] if t["content"] != "<unk>"}}
    pieces = b"".join(_proto(1, _proto(1, t.encode()) + _proto(2, float(s)) + _proto(3, 6 if t.startswith("<0x") else kinds.get(t, 1)))
                      for t, s in zip(texts, scores))
    out_dir.mkdir()
    prefix = any(n["type"] == "Prepend" for n in tj["normalizer"]["normalizers"])
    (out_dir / "tokenizer.model").write_bytes(pieces + _proto(2, _proto(3, 2)) + _proto(3, _proto(3, int(prefix))))
    (out_dir / "tokenizer_config.json").write_text((tokenizer_dir / "tokenizer_config.json").read_text())


def test_a_tokenizer_model_alone_converts_like_its_tokenizer_json(build_family, tmp_path):
    """The original LLaVA checkpoints ship only tokenizer.model (no sentencepiece package needed to read
    it): llama.cpp then tokenizes as transformers does with the tokenizer.json of the same vocabulary."""
    from tokenizers import Tokenizer

    from convert.tokenizer_gguf import add_tokenizer
    from llava_local.llama_lib import llama_cpp_lib
    L = llama_cpp_lib()
    for name in ("mistral_instruct", "chatml_direct"):
        ckpt = build_family(name)[1]
        _write_sentencepiece_model(ckpt, tmp_path / name)
        hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        path = tmp_path / f"{name}-vocab.gguf"
        w = gguf.GGUFWriter(path, "llama")
        info = add_tokenizer(w, tmp_path / name, n_vocab=hf.get_vocab_size())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert info["model"] == "llama" and info["n_tokens"] == hf.get_vocab_size()
        params = L.llama_model_default_params()
        params.vocab_only = True
        model = L.llama_model_load_from_file(str(path).encode(), params)
        assert model
        try:
            vocab = L.llama_model_get_vocab(model)
            assert bool(L.llama_vocab_get_add_bos(vocab)) == (name == "mistral_instruct")
            for text in TRICKY_TEXTS:
                buf = (L.llama_token * 256)()
                n = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 256, False, True)
                assert list(buf[:n]) == hf.encode(text, add_special_tokens=False).ids, (name, text)
        finally:
            L.llama_model_free(model)


def test_a_broken_tokenizer_model_is_a_clear_error(tmp_path):
    from convert.tokenizer_gguf import add_tokenizer
    (tmp_path / "tokenizer.model").write_bytes(_proto(1, _proto(1, b"<unk>"))[:-2])
    with pytest.raises(ConversionError, match="not a SentencePiece model"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path, n_vocab=10)
    (tmp_path / "tokenizer.model").write_bytes(_proto(1, _proto(1, b"<unk>") + _proto(3, 2)))   # unigram (default)
    with pytest.raises(ConversionError, match="unigram"):
        add_tokenizer(gguf.GGUFWriter(tmp_path / "y.gguf", "llama"), tmp_path, n_vocab=10)
