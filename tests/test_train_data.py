"""train/data.py: label masks, and training ids equal to the ids the runtime builds with llama.cpp.

    .venv/bin/python -m pytest -q tests/test_train_data.py
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llava_local.image.preprocess import PreprocessConfig, preprocess
from llava_local.errors import ImageError
from llava_local.image.load import load_image
from llava_local.prompts.templates import get_template, tokenize_segments
from train.data import (IGNORE_INDEX, IMAGE_PLACEHOLDER, DataConfig, LlavaDataset, collate, encode, n_targets,
                        to_messages, truncate)
from train.tokenizer import load_tokenizer

N_IMG = 16   # train.tiny_models: 56 px / 14 px patches -> 4x4

THREE_TURNS = [
    {"from": "human", "value": "What colour is the circle?\n<image>"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "3."},
    {"from": "human", "value": "Where is the blue square?"},
    {"from": "gpt", "value": "Top left."},
]


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt[1])


def _answers_with_eos(tok, answers: list[str]) -> list[list[int]]:
    return [tok.encode(" " + a) + [tok.eos_id] for a in answers]   # vicuna_v1: answer_prefix " "


def test_three_turn_labels_are_exactly_the_answers_and_their_eos(tok):
    t = get_template("vicuna_v1")
    msgs = to_messages(THREE_TURNS, template=t, has_image=True)
    ids, labels = encode(msgs, t, tok, N_IMG)
    assert len(ids) == len(labels)
    mask = np.asarray(labels) != IGNORE_INDEX
    # the labelled positions form three runs, each exactly one answer followed by EOS
    runs, cur = [], []
    for i, m in enumerate(mask):
        if m:
            cur.append(ids[i])
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert runs == _answers_with_eos(tok, ["Red.", "3.", "Top left."])
    assert all(lab == i for i, lab, m in zip(ids, labels, mask) if m)     # labels are the ids themselves
    assert sum(i == IMAGE_PLACEHOLDER for i in ids) == N_IMG               # one image, expanded
    assert not mask[np.asarray(ids) == IMAGE_PLACEHOLDER].any()
    assert ids.count(tok.eos_id) == 3 and mask[-1]                          # conversation ends on EOS
    # everything else is the prompt: system, "USER: ", questions, " ASSISTANT:"
    prompt_text = tok.hf.decode([i for i, m in zip(ids, mask) if not m and i >= 0])
    assert prompt_text.startswith(t.system) and prompt_text.count("USER: ") == 3
    assert prompt_text.count(" ASSISTANT:") == 3 and "Red" not in prompt_text


def test_image_marker_moves_to_the_front_or_stays(tok):
    t = get_template("vicuna_v1")
    front = to_messages(THREE_TURNS, template=t, has_image=True)
    assert front[0].content == "<image>\nWhat colour is the circle?"
    kept = to_messages(THREE_TURNS, template=t, has_image=True, image_position="keep")
    assert kept[0].content == "What colour is the circle?\n<image>"
    ids, _ = encode(kept, t, tok, N_IMG)
    first_img = ids.index(IMAGE_PLACEHOLDER)
    assert "circle" in tok.hf.decode([i for i in ids[:first_img] if i >= 0])   # the question precedes the image
    # an image record with no marker gets one in front; a marker without an image is an error
    no_marker = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yes."}]
    assert to_messages(no_marker, template=t, has_image=True)[0].content == "<image>\nHi?"
    with pytest.raises(ValueError, match="without an image"):
        to_messages(THREE_TURNS, template=t, has_image=False)
    late = THREE_TURNS[:2] + [{"from": "human", "value": "<image> again"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(ValueError, match="first human turn"):
        to_messages(late, template=t, has_image=True)


def test_plain_template_trains_only_the_caption(tok):
    t = get_template("plain")
    conv = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "A red circle."}]
    ids, labels = encode(to_messages(conv, template=t, has_image=True), t, tok, N_IMG)
    caption = tok.encode("A red circle.") + [tok.eos_id]
    assert ids == [IMAGE_PLACEHOLDER] * N_IMG + caption                     # LLaVA's preprocess_plain
    assert labels == [IGNORE_INDEX] * N_IMG + caption


def test_training_prompt_tokens_equal_runtime_tokens(tok, converted_f32):
    """The ids training builds equal llama.cpp's for the converted model: for the whole conversation,
    and for each prompt the runtime would send (Engine.prompt_items, with a generation prompt)."""
    from llava_local.runtime.llm import LlamaLLM
    t = get_template("vicuna_v1")
    msgs = to_messages(THREE_TURNS, template=t, has_image=True)
    ids, labels = encode(msgs, t, tok, N_IMG)
    llm = LlamaLLM(converted_f32.llm_path, n_ctx=256)
    try:
        runtime = tokenize_segments(t.segments(msgs), llm.tokenize, llm.bos, llm.eos)
        flat = []
        for item in runtime.items:
            flat += [IMAGE_PLACEHOLDER] * N_IMG if isinstance(item, int) else item
        assert flat == ids
        # each turn's prompt, as the runtime builds it, is the training sequence up to that answer
        starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
        for turn, start in enumerate(starts):
            segs = t.segments(msgs[:2 * turn + 1], add_generation_prompt=True)
            items = tokenize_segments(segs, llm.tokenize, llm.bos, llm.eos).items
            prompt = []
            for item in items:
                prompt += [IMAGE_PLACEHOLDER] * N_IMG if isinstance(item, int) else item
            assert prompt == ids[:start], f"turn {turn}"
        assert llm.bos == tok.bos_id and llm.eos == tok.eos_id
    finally:
        llm.close()


def test_truncation_never_keeps_half_an_image():
    ids = [5, 6] + [IMAGE_PLACEHOLDER] * 4 + [7, 8]
    labels = [IGNORE_INDEX] * 6 + [7, 8]
    assert truncate(ids, labels, 7) == (ids[:7], labels[:7], True)
    cut_ids, cut_labels, kept = truncate(ids, labels, 4)
    assert cut_ids == [5, 6] and not kept and len(cut_labels) == 2


def test_dataset_and_collate(tmp_path, tok):
    from PIL import Image
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "a.png")
    recs = [{"id": "a", "image": "a.png", "conversations": THREE_TURNS[:2]},
            {"id": "b", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    pp = PreprocessConfig(image_size=56)
    ds = LlavaDataset(DataConfig(tmp_path / "d.json", tmp_path, get_template("vicuna_v1"), N_IMG, pp), tok)
    a, b = ds[0], ds[1]
    assert torch.equal(a["pixel_values"], torch.from_numpy(preprocess(load_image(tmp_path / "a.png").image, pp)))
    assert b["pixel_values"] is None
    batch = collate([a, b], pad_id=tok.pad_id)
    assert batch["pixel_values"].shape == (1, 3, 56, 56)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][1].sum()) == len(b["input_ids"])
    assert n_targets(batch["labels"]) == len(tok.encode(" Red.")) + len(tok.encode(" Hi.")) + 2
    bad = [{"id": "x", "conversations": [{"from": "robot", "value": "?"}]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="record 'x'.*unknown speaker"):
        LlavaDataset(DataConfig(tmp_path / "bad.json", tmp_path, get_template("vicuna_v1"), N_IMG, pp), tok)[0]


def test_independent_turns_train_as_separate_conversations(tmp_path, tok, tiny_ckpt):
    """A record with "independent_turns" packs its questions into one sequence; its summed loss must
    equal the sum over the same questions asked as separate single-turn records (the turn mask hides
    the other turns' answers, positions restart after the shared prefix)."""
    from PIL import Image

    from train.forward import LlavaForTraining
    from train.model import load_llava
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "a.png")
    packed = {"id": "p", "image": "a.png", "conversations": THREE_TURNS, "independent_turns": True}
    single = [{"id": f"s{j}", "image": "a.png", "conversations": THREE_TURNS[j:j + 2]} for j in range(0, 6, 2)]
    (tmp_path / "p.json").write_text(json.dumps([packed]))
    (tmp_path / "s.json").write_text(json.dumps(single))
    pp = PreprocessConfig(image_size=56)
    core = LlavaForTraining(load_llava(tiny_ckpt[1]).eval())

    def loss(name: str) -> tuple[float, int]:
        ds = LlavaDataset(DataConfig(tmp_path / name, tmp_path, get_template("vicuna_v1"), N_IMG, pp), tok)
        batch = collate([ds[i] for i in range(len(ds))], pad_id=tok.pad_id)
        with torch.no_grad():
            return float(core(**batch)), n_targets(batch["labels"])

    (lp, np_), (ls, ns) = loss("p.json"), loss("s.json")
    assert np_ == ns == sum(len(t) for t in _answers_with_eos(tok, ["Red.", "3.", "Top left."]))
    assert abs(lp - ls) < 1e-4 * abs(ls)


def test_cached_dataset_serves_items_without_reading_again(tmp_path, tok):
    from PIL import Image
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": THREE_TURNS[:2]}]))
    pp = PreprocessConfig(image_size=56)
    cached = LlavaDataset(DataConfig(tmp_path / "d.json", tmp_path, get_template("vicuna_v1"), N_IMG, pp, cache=True), tok)
    plain = LlavaDataset(DataConfig(tmp_path / "d.json", tmp_path, get_template("vicuna_v1"), N_IMG, pp), tok)
    first, reference = cached[0], plain[0]
    (tmp_path / "a.png").unlink()
    again = cached[0]                                    # from memory: the file is gone
    for key in ("input_ids", "labels", "pixel_values"):
        assert torch.equal(again[key], reference[key]) and torch.equal(first[key], reference[key])
    with pytest.raises(ImageError, match="no such file"):
        plain[0]                                         # without the cache the file is read again
