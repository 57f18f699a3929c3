"""One conversation, the same token ids on every path that builds a prompt: a chat session, the
caption worker, the eval judge and text generation (the datagen teacher) all render and tokenize
through prompts/turns.py. Recorded at the LLM, as llama.cpp receives them."""
from __future__ import annotations

import pytest

from llava_local.caption.worker import WorkerConfig, _Worker, resolve_worker
from llava_local.eval.judge import Judge, judge_messages
from llava_local.eval.questions import Question
from llava_local.prompts.templates import Message
from llava_local.runtime.engine import Engine
from llava_local.runtime.model_pair import resolve_pair
from llava_local.runtime.model_source import DEMO_DIR, SAMPLES_DIR
from llava_local.runtime.options import EngineOptions
from llava_local.runtime.text_generation import TextGenerator

SYSTEM = "You answer questions about pictures of shapes."
IMAGE = SAMPLES_DIR / "shapes-1.png"


def _record(llm) -> list:
    """What the LLM is asked to evaluate: token id lists, and ("image", n_rows) for embeddings."""
    calls = []
    eval_tokens, eval_embeddings = llm.eval_tokens, llm.eval_embeddings
    llm.eval_tokens = lambda toks: (calls.append(list(toks)), eval_tokens(toks))[1]
    llm.eval_embeddings = lambda e: (calls.append(("image", len(e))), eval_embeddings(e))[1]
    return calls


@pytest.fixture(scope="module")
def pair():
    return resolve_pair(DEMO_DIR)


@pytest.fixture(scope="module")
def engine(pair):
    eng = Engine(pair, EngineOptions(threads=1, n_ctx=1024, vision_backend="torch"))
    yield eng
    eng.close()


def test_chat_and_caption_send_the_same_ids_for_an_image_question(engine, pair):
    prompt = "What shapes are in the picture?"
    calls = _record(engine.llm)
    engine.chat_session(system=SYSTEM, max_tokens=1).ask(prompt, [IMAGE])
    chat = calls[:3]                                         # text, image, text; then the answer's token
    cfg = resolve_worker(WorkerConfig(str(pair.llm_path), str(pair.mmproj_path), prompt, system=SYSTEM,
                                      parallel=1, max_tokens=8, engine=EngineOptions(threads=1)), pair)
    worker = _Worker(cfg, pair)
    try:
        caption = [worker.prefix, ("image", pair.image_tokens), worker.suffix]
    finally:
        worker.close()
    assert chat == caption
    assert len(chat[0]) > 10 and len(chat[2]) > 5


def test_chat_judge_and_text_generation_send_the_same_ids_for_a_text_conversation(engine, pair):
    q = Question("q1", "shapes-1.png", "How many shapes are there?", "Two.", context="A red circle and a blue star.")
    messages = judge_messages(q.context, q.question, q.answer, "Three.")
    assert [m.role for m in messages] == ["system", "user"]
    calls = _record(engine.llm)
    engine.chat_session(system=messages[0].content, max_tokens=1).ask(messages[1].content)
    chat = calls[0]

    judge = Judge(TextGenerator(pair.llm_path, threads=1), max_tokens=1)
    judge_calls = _record(judge.generator.llm)
    try:
        judge.rate(q, "Three.")
    finally:
        judge.close()

    teacher = TextGenerator(pair.llm_path, threads=1)
    teacher_calls = _record(teacher.llm)
    try:
        teacher.generate([Message("system", messages[0].content), Message("user", messages[1].content)],
                         max_tokens=1)
    finally:
        teacher.close()
    assert chat == judge_calls[0] == teacher_calls[0]
    assert len(chat) > 100


def test_the_one_bos_rule():
    """A vocabulary that adds BOS gets it once, at the start of the context, whether or not the
    template writes it; a vocabulary without BOS (the demo's) gets none."""
    from llava_local.prompts.render import choose_format
    from llava_local.prompts.turns import PromptBuilder
    vocab = {"<s>": 1}

    def tokenize(text):   # special token texts parse to their id, other characters to their code point
        out, i = [], 0
        while i < len(text):
            if text.startswith("<s>", i):
                out.append(vocab["<s>"])
                i += 3
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    msgs = [Message("user", "<image>\nHi")]
    for bos_text in ("<s>", ""):        # the template writes BOS, or it does not
        fmt = choose_format(override="vicuna_v1", gguf_template=None, named=None, bos_text=bos_text, eos_text="</s>")
        before, after = PromptBuilder(fmt, tokenize, 1).parts(msgs, n_images=1)
        assert before[0] == 1 and before.count(1) == 1 and 1 not in after
        assert PromptBuilder(fmt, tokenize, 1).tokenize("USER: more", at_start=False)[0] != 1
    fmt = choose_format(override="vicuna_v1", gguf_template=None, named=None, bos_text="", eos_text="</s>")
    assert 1 not in PromptBuilder(fmt, tokenize, None).parts(msgs, n_images=1)[0]
