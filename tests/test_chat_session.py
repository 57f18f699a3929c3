"""Chat sessions: KV-cache reuse (measured with token counters), the image-embedding cache, REPL vs
one-shot equality, save/load, errors that leave the session usable, and the Python API."""
from __future__ import annotations

import time

import pytest

import llava_local
from conftest import random_image
from llava_local.runtime.engine import Engine
from llava_local.errors import ContextOverflowError, ImageError, LlavaLocalError
from llava_local.image.load import load_image
from llava_local.prompts.render import JinjaFormat, NamedFormat, choose_format
from llava_local.prompts.templates import Message, get_template, TemplateError


@pytest.fixture(scope="module")
def engine(pair_f32):
    eng = Engine(pair_f32, vision_backend="torch", n_ctx=1024)
    yield eng
    eng.close()


@pytest.fixture()
def img(tmp_path):
    p = tmp_path / "a.png"
    random_image(64, 48, 11).save(p)
    return p


@pytest.fixture()
def img2(tmp_path):
    p = tmp_path / "b.png"
    random_image(30, 70, 12).save(p)
    return p


def test_three_turns_evaluate_only_new_tokens_and_encode_once(engine, img):
    s = engine.chat_session(max_tokens=8)
    enc0 = engine.n_images_encoded
    questions = ["What is in the image?", "What colour is it?", "Anything else?"]
    for i, q in enumerate(questions):
        before = engine.llm.n_evaluated
        kv_before = engine.llm.n_past
        s.ask(q, [img] if i == 0 else [])
        a = s.last
        evaluated = engine.llm.n_evaluated - before
        if i == 0:
            assert a.n_reused == 0 and a.n_prompt_tokens > engine.pair.image_tokens
        else:
            # only this turn's new text: "USER: <q> ASSISTANT:" tokens, nothing before it again
            new_text = f"USER: {q} ASSISTANT:"
            assert a.n_prompt_tokens == len(engine.llm.tokenize(new_text))
            assert a.n_reused == kv_before
        # prompt + each generated token once + the closing end-of-turn token
        assert evaluated == a.n_prompt_tokens + len(a.tokens) + 1
    assert engine.n_images_encoded - enc0 == 1


def test_same_image_in_new_conversation_is_not_reencoded(engine, img):
    engine.ask("Describe.", [img], max_tokens=2)
    n = engine.n_images_encoded
    s = engine.chat_session(max_tokens=2)
    s.ask("Describe again.", [load_image(img)])
    assert engine.n_images_encoded == n and s.last.timings["image_cache_hits"] == 1


def test_session_answers_equal_one_shot_answers(engine, img, tmp_path):
    s = engine.chat_session(max_tokens=10)
    first = s.ask("What is shown?", [img])
    assert first.tokens == engine.ask("What is shown?", [img], max_tokens=10).tokens
    second = s.ask("Tell me more.")
    # one-shot of the same conversation: a fresh session prefilled with the saved history
    path = tmp_path / "conv.json"
    s.messages = s.messages[:-2]       # history up to the first answer
    s.image_sources = s.image_sources
    s.save(path)
    fresh = engine.chat_session(max_tokens=10)
    fresh.load(path)
    again = fresh.ask("Tell me more.")
    assert again.n_reused == 0              # fully re-evaluated
    assert again.tokens == second.tokens


def test_save_and_load_round_trip(engine, img, tmp_path):
    s = engine.chat_session(max_tokens=4)
    s.ask("Hello?", [img])
    p = tmp_path / "c.json"
    s.save(p)
    t = engine.chat_session()
    t.load(p)
    assert t.messages == s.messages and len(t.images) == 1


def test_errors_leave_the_session_usable(engine, img, tmp_path):
    s = engine.chat_session(max_tokens=4)
    s.ask("First question", [img])
    n_msgs = len(s.messages)
    with pytest.raises(ImageError):
        s.ask("Look at this", [tmp_path / "missing.png"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError):
        s.ask("And this", [bad])
    with pytest.raises(LlavaLocalError, match="empty prompt"):
        s.ask("   ")
    with pytest.raises(ContextOverflowError):
        s.ask("word " * 2000)
    assert len(s.messages) == n_msgs
    a = s.ask("Still there?")
    assert a.n_reused > 0 and len(s.messages) == n_msgs + 2


def test_interrupted_answer_keeps_the_session(engine, img):
    s = engine.chat_session(max_tokens=50)
    gen = s.send("Talk.", [img])
    next(gen)
    s.stop()
    for _ in gen:
        pass
    assert s.last.finish_reason == "interrupted" and len(s.last.tokens) <= 2
    before = engine.llm.n_past
    a = s.ask("Go on.")
    assert a.n_reused == before


def test_clear_starts_over(engine, img):
    s = engine.chat_session(max_tokens=3)
    s.ask("Hi", [img])
    s.clear()
    a = s.ask("Hi again")
    assert a.n_reused == 0 and len(s.messages) == 2


def test_python_api(pair_f32, img):
    with llava_local.load(pair_f32.llm_path.parent, vision_backend="torch") as m:
        text = m.ask(img, "What is it?", max_tokens=6)
        assert isinstance(text, str) and text
        s = m.chat_session(max_tokens=6)
        pieces = list(s.send("What is it?", images=[img]))
        assert "".join(pieces).strip() == text
        assert "".join(s.send("More?")).strip() == s.last.text


# --- chat templates from GGUF metadata ---------------------------------------------------------------

def test_our_own_template_is_used_by_name(engine):
    assert isinstance(engine.format, NamedFormat) and engine.format.name == "vicuna_v1"


def test_foreign_jinja_template_is_rendered_in_sandbox():
    src = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fmt = choose_format(override=None, gguf_template=src, named=None, bos_text="", eos_text="</s>")
    assert isinstance(fmt, JinjaFormat)
    out = fmt.render([Message("user", "<image>\nHi")], add_generation_prompt=True)
    assert out == "<|user|><image>\nHi</s><|assistant|>"


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'x' * 1000000000000 }}",
    "{% set s = 'ab' %}{% for i in range(60) %}{% set s = s + s %}{% endfor %}{{ s }}",
    "{{ raise_exception('nope') }}",
    "{% for m in messages %}",
])
def test_hostile_templates_fail_bounded_and_fall_back(evil):
    t0 = time.perf_counter()
    fmt = choose_format(override=None, gguf_template=evil, named=None, bos_text="", eos_text="</s>")
    assert time.perf_counter() - t0 < 5
    assert isinstance(fmt, NamedFormat) and fmt.name == "vicuna_v1"


def test_hostile_template_render_raises_template_error():
    fmt = JinjaFormat("{{ ''.__class__.__mro__ }}", "", "</s>")
    with pytest.raises(TemplateError):
        fmt.render([Message("user", "x")], add_generation_prompt=True)


def test_template_override_by_name(pair_f32):
    eng = Engine(pair_f32, vision_backend="torch", n_ctx=256, template="plain")
    try:
        assert eng.format.name == "plain"
    finally:
        eng.close()
    with pytest.raises(TemplateError):
        get_template("nope")


def test_runtime_prompt_tokens_equal_the_training_segments(engine):
    """The runtime renders one string and its prompt builder tokenizes it around the images; training
    tokenizes the template's segments. For a multi-turn conversation with an image both give the same ids."""
    from llava_local.prompts.templates import get_template, tokenize_segments
    msgs = [Message("user", "<image>\nWhat colour is the circle?"), Message("assistant", "Red."),
            Message("user", "How many shapes are there?"), Message("assistant", "Three."),
            Message("user", "Which shape is left of the red one?")]
    segs = get_template(engine.format.name).segments(msgs, add_generation_prompt=True)
    training = tokenize_segments(segs, engine.llm.tokenize, engine.llm.bos, engine.llm.eos).items
    runtime = []
    for i, part in enumerate(engine.prompt.parts(msgs, n_images=1)):
        if i:
            runtime.append(-i)
        runtime += part
    flat = []
    for it in training:
        flat += it if isinstance(it, list) else [it]
    assert runtime == flat
    assert engine.prompt_items(msgs) == [engine.prompt.parts(msgs)[0], -1, engine.prompt.parts(msgs)[1]]
