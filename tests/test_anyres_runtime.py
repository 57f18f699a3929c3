"""LLaVA-1.6 ("anyres") through every runtime entry point: each image takes its own number of tokens.

A tiny random LlavaNext (conftest `converted_next_f32`: 56-px tiles, grids of up to 2 x 2) answers
through Engine.ask, a ChatSession, `llava-local run` / `chat -p`, a caption job and the server's
engine loop, with no 1.6-specific flag. Images of different aspects take different token counts
(image/anyres.py gives them; test_anyres_vision.py checks them against transformers), and every
path counts each image's own: the prompt positions it reports, the context check made before
anything is encoded, the conversation cache's segments. `--image-max-tiles` lowers the count and
keys the embedding cache.
"""
from __future__ import annotations

import json
import re
import time

import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error, random_image
from llava_local.cli.main import main
from llava_local.errors import ContextOverflowError
from llava_local.image.anyres import image_token_count
from llava_local.image.load import load_image
from llava_local.prompts.templates import Message
from llava_local.prompts.turns import user_content
from llava_local.runtime.engine import Engine
from llava_local.runtime.model_pair import resolve_pair
from llava_local.runtime.options import EngineOptions
from llava_local.runtime.sampling import SamplingParams

PROMPT = "Describe it."
FAST = dict(vision_backend="native", threads=1, n_ctx=512)   # the native backend starts fastest
FAST_FLAGS = ["--vision-backend", "native", "--threads", "1", "--ctx", "512", "--max-tokens", "8"]
# (width, height): 4:3, 4:9, 1:1 (the largest grid), 20:3 — four different token counts
SIZES = [(80, 60), (40, 90), (112, 112), (200, 30)]


@pytest.fixture(scope="module")
def pair(converted_next_f32):
    p = resolve_pair(converted_next_f32.llm_path.parent)
    assert p.anyres and p.max_image_tokens() > p.image_tokens
    return p


@pytest.fixture(scope="module")
def engine(pair):
    eng = Engine(pair, **FAST)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def images():
    return [load_image(random_image(w, h, seed=i)) for i, (w, h) in enumerate(SIZES)]


def _text_positions(engine, n_images: int = 1) -> int:
    before, after = engine.prompt.parts([Message("user", user_content(PROMPT, n_images))], n_images=n_images)
    return len(before) + len(after)


def test_each_image_counts_its_own_tokens(engine, pair, images):
    counts = engine.image_tokens(images)
    assert counts == [image_token_count(pair.mmproj, *im.image.size) for im in images]
    assert len(set(counts)) == len(SIZES)
    assert all(pair.image_tokens < n <= pair.max_image_tokens() for n in counts)
    assert counts[2] == pair.max_image_tokens()     # a square image fills the 2 x 2 grid: nothing unpadded
    embeds = engine.encode_images([im.image for im in images])
    assert [e.shape for e in embeds] == [(n, pair.n_embd) for n in counts]
    text = _text_positions(engine)
    for im, n in zip(images, counts):
        a = engine.ask(PROMPT, [im], max_tokens=4)
        assert a.n_prompt_tokens == text + n and a.text


def test_chat_session_turns_with_images_of_different_sizes(engine, images):
    s = engine.chat_session(max_tokens=6)
    first = s.ask(PROMPT, [images[0]])
    second = s.ask("And this one?", [images[3]])
    n0, n3 = engine.image_tokens([images[0], images[3]])
    assert first.n_prompt_tokens > n0 and second.n_reused >= first.n_prompt_tokens
    assert n3 < second.n_prompt_tokens < n3 + 30                # only the new turn: text + its own image
    assert second.timings["images_encoded"] + second.timings["image_cache_hits"] == 1


def test_image_max_tiles_lowers_the_count_and_keys_the_cache(engine, pair, images):
    square = images[2]
    fewer = Engine(pair, EngineOptions(image_max_tiles=2, **FAST))
    try:
        n_all, n_two = engine.image_tokens([square])[0], fewer.image_tokens([square])[0]
        assert n_two < n_all and n_two <= pair.max_image_tokens(2) < pair.max_image_tokens()
        assert fewer.image_keys([square]) != engine.image_keys([square])
        assert fewer.encode_images([square.image])[0].shape == (n_two, pair.n_embd)
        assert fewer.ask(PROMPT, [square], max_tokens=2).n_prompt_tokens == _text_positions(fewer) + n_two
    finally:
        fewer.close()


def test_embedding_cache_is_bounded_by_bytes_as_well_as_images(engine, images, monkeypatch):
    import llava_local.runtime.engine as engine_mod
    sizes = [e.nbytes for e in engine.encode_images([im.image for im in images])]   # 1.6: sizes differ
    monkeypatch.setattr(engine_mod, "EMBED_CACHE_BYTES", sizes[2] + sizes[3])
    engine._embed_cache.clear()
    for im in images:
        engine.image_embeddings([im])
    assert list(engine._embed_cache) == engine.image_keys(images[2:])      # the most recent that fit
    embeds, hits = engine.image_embeddings(images)    # more than the bound in one call: all of them, then
    assert [e.nbytes for e in embeds] == sizes and hits == 2 and len(engine._embed_cache) == 4


def test_context_too_small_for_the_tiles_names_both_numbers(pair, images, tmp_path):
    biggest = pair.max_image_tokens()
    with pytest.raises(ContextOverflowError, match=f"image needs {biggest} tokens, n_ctx is 64: .*image-max-tiles"):
        Engine(pair, **{**FAST, "n_ctx": 64})                  # before llama.cpp loads anything
    eng = Engine(pair, **{**FAST, "n_ctx": 2 * biggest})       # any one image fits (llama.cpp rounds n_ctx up)
    try:
        n = eng.image_tokens(images)
        assert sum(n) >= eng.llm.n_ctx                          # ... all four together do not
        need = re.escape(f"4 images need {sum(n)} tokens ({' + '.join(map(str, n))}, +")
        with pytest.raises(ContextOverflowError, match=need + rf"\d+ text\), n_ctx is {eng.llm.n_ctx}: raise --ctx"):
            eng.ask(PROMPT, images)
        assert eng.n_images_encoded == 0 and eng.llm.n_past == 0   # refused before encoding or any prefill
    finally:
        eng.close()
    path = tmp_path / "square.png"
    images[2].image.save(path)
    res = CliRunner().invoke(main, ["run", "--model", str(pair.llm_path.parent), "-p", PROMPT, *FAST_FLAGS[:4],
                                    "--ctx", "64", str(path)])
    assert_one_line_error(res, f"image needs {biggest} tokens, n_ctx is 64")


def test_run_and_chat_cli_answer_like_the_engine(engine, pair, images, tmp_path):
    paths = []
    for i, im in enumerate(images[:3]):
        paths.append(tmp_path / f"img{i}.png")
        im.image.save(paths[-1])
    model = ["--model", str(pair.llm_path.parent)]
    res = CliRunner().invoke(main, ["run", *model, "-p", PROMPT, *FAST_FLAGS, str(paths[0])])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == engine.ask(PROMPT, [images[0]], max_tokens=8).text
    res = CliRunner().invoke(main, ["chat", *model, "-p", PROMPT, "--json", *FAST_FLAGS, "--image-max-tiles", "2",
                                    str(paths[2])])
    assert res.exit_code == 0, res.output
    two_tiles = image_token_count(pair.mmproj, *images[2].image.size, max_tiles=2)
    assert two_tiles < engine.image_tokens([images[2]])[0]
    assert json.loads(res.stdout)["n_prompt_tokens"] == _text_positions(engine) + two_tiles
    res = CliRunner().invoke(main, ["chat", *model, "-p", PROMPT, *FAST_FLAGS, "--image-max-tiles", "1", str(paths[2])])
    assert_one_line_error(res, "image max tiles 1", "2 tiles")     # no grid of this model is that small


def test_caption_job_admits_each_image_by_its_own_count(pair, images, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(images):
        im.image.save(d / f"{i}.png")
    out = tmp_path / "captions.jsonl"
    res = CliRunner().invoke(main, ["caption", str(d), "-o", str(out), "--model", str(pair.llm_path.parent),
                                    "-p", PROMPT, "--parallel", "2", *FAST_FLAGS[:4], "--max-tokens", "4"])
    assert res.exit_code == 0, res.output
    recs = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(recs) == len(images) and all(r["status"] == "ok" for r in recs.values())
    eng = Engine(pair, **FAST)   # the counts of the images as they are (never squared first), in each record
    try:
        text = _text_positions(eng)
        for i, im in enumerate(images):
            rec = next(r for k, r in recs.items() if k.endswith(f"{i}.png"))
            assert rec["n_prompt_tokens"] == text + eng.image_tokens([im])[0]
    finally:
        eng.close()


def test_server_engine_loop_sizes_each_image_and_reuses_the_conversation(pair, engine, images):
    from llava_local.server.worker import ChatRequest, ServeConfig, ServeWorker
    sent: list = []
    worker = ServeWorker(ServeConfig(EngineOptions(n_seq_max=2, **FAST), max_prompt_tokens=512), pair, sent.append)

    def answer(rid, messages, imgs):
        worker._handle(("req", rid, ChatRequest(tuple(messages), tuple(imgs), SamplingParams(), 6)))
        deadline = time.time() + 30
        while not any(m[0] in ("done", "error") and m[1] == rid for m in sent) and time.time() < deadline:
            worker._admit()
            if worker.decoder.active:
                worker._step()
        msg = next(m for m in sent if m[1] == rid and m[0] in ("done", "error"))
        assert msg[0] == "done", msg
        return msg[2]

    try:
        s = engine.chat_session(max_tokens=6)
        turn1 = [("user", user_content(PROMPT, 1))]
        r1 = answer("a", turn1, [images[3]])
        ref1 = s.ask(PROMPT, [images[3]])
        assert (r1["text"], r1["prompt_tokens"]) == (ref1.text, ref1.n_prompt_tokens)
        turn2 = turn1 + [("assistant", r1["text"]), ("user", user_content("And this one?", 1))]
        r2 = answer("b", turn2, [images[3], images[1]])
        ref2 = s.ask("And this one?", [images[1]])
        assert r2["text"] == ref2.text
        # the first turn's cells (its image's own count) are reused; only the new turn and image are evaluated
        assert r2["cached_tokens"] == r1["prompt_tokens"] + r1["completion_tokens"] - (r1["finish_reason"] == "length")
        assert r2["prompt_tokens"] - r2["cached_tokens"] < engine.image_tokens([images[1]])[0] + 30
        assert (r2["images_encoded"], r2["image_cache_hits"]) == (1, 0)
        eight = images * 2                                          # 512 image positions: over the limit
        worker._handle(("req", "c", ChatRequest((("user", user_content(PROMPT, 8)),), tuple(eight),
                                                SamplingParams(), 6)))
        worker._admit()
        err = next(m for m in sent if m[1] == "c")
        assert err[:3] == ("error", "c", 400), err
        assert f"(new images: {' + '.join(map(str, engine.image_tokens(eight)))}), over this server's limit of 512" \
            in err[3]
    finally:
        worker.close()
