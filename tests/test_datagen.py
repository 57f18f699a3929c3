"""GPT-assisted instruction data with a local teacher (train/datagen*.py): annotations in, the
teacher's text parsed, validated and deduplicated, LLaVA JSON out that train/data.py reads, and a
resumed run that neither repeats nor duplicates work. The teacher is the real SmolLM2-135M-Instruct."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from llava_local.prompts.templates import IMAGE_MARKER, get_template
from train.data import to_messages
from train.coco_annotations import load_annotations, symbolic
from train.datagen import DatagenConfig, generate_dataset, journal_path, read_journal
from train.datagen_prompts import KINDS, teacher_messages
from train.datagen_records import (ParseError, build_record, dedup_key, parse_teacher_output, trim_truncated,
                                   validate_record)
from train.shapes_coco import write_shapes_coco
from train.tiny_models import SMOLLM2_GGUF

needs_smollm2 = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="SmolLM2 GGUF missing: run `make deps`")


def assert_valid_llava_json(records: list[dict]) -> None:
    """The schema train/data.py reads, checked by its own loader and by the validator."""
    assert isinstance(records, list) and records
    for rec in records:
        assert set(rec) == {"id", "image", "conversations"}, rec
        assert validate_record(rec) == [], (rec, validate_record(rec))
        msgs = to_messages(rec["conversations"], template=get_template("vicuna_v1"), has_image=True)
        assert sum(m.content.count(IMAGE_MARKER) for m in msgs) == 1
        assert [m.role for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)


# --- annotations and the symbolic representation ---

def test_coco_instances_and_captions_files_merge(tmp_path):
    (tmp_path / "inst.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100}],
        "annotations": [{"image_id": 7, "bbox": [20, 10, 100, 50], "category_id": 3}],
        "categories": [{"id": 3, "name": "dog"}]}))
    (tmp_path / "caps.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100}],
        "annotations": [{"image_id": 7, "caption": "A dog  on grass. "}]}))
    [ctx] = load_annotations([tmp_path / "inst.json", tmp_path / "caps.json"])
    assert symbolic(ctx) == "A dog on grass.\ndog: [0.100, 0.100, 0.600, 0.600]"


def test_shapes_coco_round_trip(tmp_path):
    ann = write_shapes_coco(tmp_path, 3)
    ctxs = load_annotations(ann)
    assert len(ctxs) == 3 and all((tmp_path / c.file_name).is_file() for c in ctxs)
    assert all(len(c.captions) == 2 and c.objects for c in ctxs)
    for c in ctxs:
        for _, box in c.objects:
            assert all(0 <= v <= 1 for v in box) and box[0] < box[2] and box[1] < box[3]
    msgs = teacher_messages("reasoning", ctxs[0])
    assert msgs[0].role == "system" and msgs[-1].content == symbolic(ctxs[0])
    assert [m.role for m in msgs[1:]] == ["user", "assistant", "user", "assistant", "user"]


# --- parsing the teacher and validating records ---

def test_parse_conversation_pairs():
    text = ("Question: What colour is the star?\nAnswer: It is red.\n===\n"
            "Q: Where is it?\nA: At the top\nleft.\nQuestion: What colour is the star?\nAnswer: Red again.\n"
            "Question: And the dangling one?")
    turns = parse_teacher_output("conversation", text, random.Random(0))
    assert turns == [("What colour is the star?", "It is red."), ("Where is it?", "At the top left.")]


@pytest.mark.parametrize("kind, text", [
    ("conversation", ""), ("conversation", "Just some text without labels."),
    ("conversation", "Answer: an answer first\nQuestion: then a question?"),
    ("reasoning", "Question: only a question?"), ("detail", "Question: what?\nAnswer: this."),
])
def test_parse_rejects_off_format(kind, text):
    with pytest.raises(ParseError):
        parse_teacher_output(kind, text, random.Random(0))


def test_detail_gets_a_paper_instruction_and_truncation_is_trimmed():
    [(q, a)] = parse_teacher_output("detail", "A red star. A blue circle sits at the bottom", random.Random(1))
    assert q.endswith(".") and "image" in q
    assert trim_truncated("detail", [(q, a)]) == [(q, "A red star.")]
    with pytest.raises(ParseError):
        trim_truncated("reasoning", [("Why?", "Because the")])


@pytest.mark.parametrize("mutate, problem", [
    (lambda c: c[0].update(value="no marker"), "0 <image> markers"),
    (lambda c: c[2].update(value=IMAGE_MARKER + "\nagain?"), "outside the first human turn"),
    (lambda c: c[1].update(value="   "), "empty"),
    (lambda c: c[3].update(**{"from": "human"}), "expected from='gpt'"),
    (lambda c: c[3].update(value="Sure.<|im_end|>"), "control text"),
    (lambda c: c[1].update(value="Red.\nQuestion: and?"), "Q/A labels"),
    (lambda c: c.pop(), "pairs"),
    (lambda c: c[3].update(value="It lies at (0.714, 0.598)."), "coordinates"),
    (lambda c: c[1].update(value="The caption says red."), "captions"),
])
def test_validator_rejects(mutate, problem):
    rec = build_record("1-conversation", "a.png", [("What colour?", "It is red."), ("Where?", "At the top left.")])
    assert validate_record(rec) == []
    mutate(rec["conversations"])
    problems = validate_record(rec)
    assert any(problem in p for p in problems), problems


def test_dedup_ignores_case_punctuation_and_spacing():
    a = build_record("x", "a.png", [("What colour is it?", "It is red.")])
    b = build_record("y", "a.png", [("what colour is it", "It is  RED!")])
    c = build_record("z", "b.png", [("What colour is it?", "It is red.")])
    assert dedup_key(a) == dedup_key(b) != dedup_key(c)


def test_torn_journal_line_is_ignored(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text('{"task": "1-detail", "rejected": "parse: x"}\n{"task": "2-det')
    assert [e["task"] for e in read_journal(p)] == ["1-detail"]


class ScriptedTeacher:
    """Answers every prompt with the same text: the second image's item is a duplicate of nothing
    (other image), but two kinds' identical text on one image is."""
    last_finish = "stop"

    def __init__(self):
        self.calls = 0

    def generate(self, messages, *, max_tokens, sampling):
        self.calls += 1
        return "Question: What colour is the shape?\nAnswer: The shape is red."


def test_prompt_too_long_for_the_teacher_is_rejected_not_fatal(tmp_path):
    from llava_local.errors import ContextOverflowError

    class Overflowing(ScriptedTeacher):
        def generate(self, messages, **kw):
            raise ContextOverflowError("the prompt needs 5000 tokens, the teacher's n_ctx is 2048")
    ann = write_shapes_coco(tmp_path, 1)
    res = generate_dataset(ann, tmp_path, Overflowing(), tmp_path / "o.json", cfg=DatagenConfig(kinds=("detail",)),
                           progress=False)
    assert res.complete and res.reasons == {"too long": 1} and json.loads((tmp_path / "o.json").read_text()) == []


def test_duplicates_are_rejected_and_resume_skips_done_tasks(tmp_path):
    ann = write_shapes_coco(tmp_path, 2)
    out = tmp_path / "out.json"
    cfg = DatagenConfig(kinds=("conversation", "reasoning"))
    teacher = ScriptedTeacher()
    res = generate_dataset(ann, tmp_path, teacher, out, cfg=cfg, limit=3, progress=False)
    assert not res.complete and res.generated == 3
    res = generate_dataset(ann, tmp_path, teacher, out, cfg=cfg, progress=False)
    assert res.complete and res.generated == 1 and res.resumed == 3 and teacher.calls == 4
    assert res.written == {"conversation": 2, "reasoning": 0} and res.reasons == {"duplicate": 2}
    assert_valid_llava_json(json.loads(out.read_text()))


# --- the real teacher, 20 shapes images ---

@needs_smollm2
def test_datagen_smollm2_twenty_images_resumes_without_duplicates(tmp_path):
    from llava_local.runtime.text_generation import TextGenerator

    ann = write_shapes_coco(tmp_path / "sc", 20)
    out = tmp_path / "instruct.json"
    # one kind per image keeps the test to ~20 short generations on a loaded 2-core machine
    cfg = DatagenConfig(per_image="cycle", n_seeds=1, max_tokens={k: 32 for k in KINDS}, seed=1)
    teacher = TextGenerator(SMOLLM2_GGUF, n_ctx=1024, threads=1)
    try:
        first = generate_dataset(ann, tmp_path / "sc", teacher, out, cfg=cfg, limit=8, progress=False)
        assert not first.complete and first.generated == 8
        assert_valid_llava_json(json.loads(out.read_text()))          # a partial run leaves valid JSON too
        second = generate_dataset(ann, tmp_path / "sc", teacher, out, cfg=cfg, progress=False)
    finally:
        teacher.close()
    assert second.complete and second.resumed == 8 and second.generated == 12
    records = json.loads(out.read_text())
    assert_valid_llava_json(records)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))                                     # resume made no duplicates
    assert len({dedup_key(r) for r in records}) == len(records)
    journal = [e["task"] for e in read_journal(journal_path(out))]
    assert len(journal) == len(set(journal)) == 20                      # every task done exactly once
    kinds = Counter(r["id"].split("-", 1)[1] for r in records)
    assert all(kinds[k] >= 1 for k in KINDS), kinds
    assert sum(second.written.values()) == len(records)
    assert sum(second.written.values()) + sum(second.rejected.values()) == 20


def test_datagen_cli_bad_input_is_one_line_error(tmp_path):
    from click.testing import CliRunner

    from conftest import assert_one_line_error
    from llava_local.cli.main import main
    bad = tmp_path / "ann.json"
    bad.write_text('{"images": [{"id": 1}]}')
    teacher = tmp_path / "t.gguf"
    teacher.write_bytes(b"GGUF")
    res = CliRunner().invoke(main, ["datagen", "--annotations", str(bad), "--images", str(tmp_path),
                                    "--teacher", str(teacher), "-o", str(tmp_path / "o.json")])
    assert_one_line_error(res, "malformed COCO-style annotations")
    res = CliRunner().invoke(main, ["datagen", "--annotations", str(bad), "--images", str(tmp_path),
                                    "--teacher", str(teacher), "--kinds", "chat", "-o", str(tmp_path / "o.json")])
    assert res.exit_code == 2 and "chat" in res.output
