"""llava-local eval: the judge-reply parser, the multiple-choice letter parser, relative scores,
and the command end to end on the tiny random model (exact match, multiple choice, judged)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import random_image
from llava_local.eval.evaluate import EvalResult, ItemResult
from llava_local.eval.judge import Judge, parse_judge_scores
from llava_local.eval.questions import Question, load_questions, mc_prompt, parse_choice
from llava_local.eval.report import markdown_report
from train.tiny_models import SMOLLM2_GGUF

needs_smollm2 = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="SmolLM2 GGUF missing: run `make deps`")


# --- judge replies ---

@pytest.mark.parametrize("reply, scores", [
    ("8 6\nAssistant 1 is more detailed.", (8, 6)),
    ("8 6", (8, 6)),
    ("  7, 9  \nBoth are fine.", (7, 9)),
    ("8/10 6/10\nexplanation", (8, 6)),
    ("Assistant 1: 8\nAssistant 2: 5\nAssistant 1 is better.", (8, 5)),
    ("8 6\nAssistant 1 receives 8 and Assistant 2 receives 6.", (8, 6)),      # consistent restatement
    ("7.5 6.5\nClose.", (7.5, 6.5)),
])
def test_judge_parser_scores(reply, scores):
    v = parse_judge_scores(reply)
    assert v.scores == scores and v.reason == ""


@pytest.mark.parametrize("reply, reason", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("Both answers are good, the second one is a bit shorter.", "no score"),           # text only
    ("I would rate them highly.\nThe reference is better.", "no score"),
    ("8 6\nOn reflection:\n5 9", "conflicting"),                                       # two score pairs
    ("Assistant 1: 8\nAssistant 2: 6\n9 3", "conflicting"),
    ("Assistant 1: 8\nAssistant 1: 4\nAssistant 2: 6", "conflicting"),
    ("Assistant 2: 7", "only one"),                                                     # one score
    ("0 6\nThe first is empty.", "out of 1-10"),
    ("8\nThe answer is fine.", "no score"),
])
def test_judge_parser_unscored(reply, reason):
    v = parse_judge_scores(reply)
    assert v.scores is None, (reply, v)
    assert reason in v.reason


def test_unscored_items_are_counted_not_averaged():
    q = lambda i, cat: Question(str(i), "x.png", "q", "ref", category=cat)   # noqa: E731
    items = [ItemResult(q(1, "detail"), "a", scores=(8.0, 6.0)),
             ItemResult(q(2, "detail"), "a", scores=(6.0, 6.0)),
             ItemResult(q(3, "detail"), "a", unscored="no score", judge_reply="nice"),
             ItemResult(q(4, "reasoning"), "a", unscored="conflicting scores: 5 9; 8 6")]
    res = EvalResult(items, 1.0)
    cats = res.per_category()
    assert cats["detail"]["relative_score"] == pytest.approx(100 * 6 / 7)
    assert (cats["detail"]["scored"], cats["detail"]["unscored"]) == (2, 1)
    assert "relative_score" not in cats["reasoning"] and cats["reasoning"]["unscored"] == 1
    assert [it.question.id for it in res.unscored()] == ["3", "4"]
    report = markdown_report(res)
    assert "unscored (no score)" in report and "`4`: conflicting" in report


class _FakeGenerator:
    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def generate(self, messages, *, max_tokens):
        self.calls.append((messages, max_tokens))
        return self.reply

    def close(self):
        pass


def test_judge_rates_against_the_reference_and_needs_a_context():
    from llava_local.errors import LlavaLocalError
    gen = _FakeGenerator("7 5\nThe reference is more precise.")
    judge = Judge(gen, max_tokens=12)
    q = Question("1", "x.png", "What is it?", "A red circle.", category="detail", context="a red circle: [0, 0, 1, 1]")
    reply, verdict = judge.rate(q, "A circle.")
    assert reply == gen.reply and verdict.scores == (7.0, 5.0)
    (messages, max_tokens), = gen.calls
    user = messages[-1].content
    assert max_tokens == 12 and messages[0].role == "system"
    assert user.index("a red circle: [0, 0, 1, 1]") < user.index("[Assistant 1]\nA red circle.") \
        < user.index("[Assistant 2]\nA circle.")
    with pytest.raises(LlavaLocalError, match="needs a 'context'"):
        judge.rate(Question("2", "x.png", "q", "ref", context="  "), "a")


# --- multiple choice ---

CHOICES = ["a cat", "a dog", "a bird"]


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) a dog", "B"), ("b", None), ("The answer is C.", "C"),
    ("Answer: (A)", "A"), ("a dog", "B"), ("A dog.", "B"), ("It is (C), clearly.", "C"),
    ("", None), ("I don't know.", None), ("The answer is A or B.", None), ("D", None),
])
def test_parse_choice(text, letter):
    assert parse_choice(text, CHOICES) == letter


def test_mc_prompt_and_gold_forms(tmp_path):
    assert mc_prompt("What?", CHOICES).splitlines()[1:3] == ["A. a cat", "B. a dog"]
    lines = [{"image": "i.png", "question": "q", "choices": CHOICES, "answer": a} for a in ("B", 1, "a dog", "(B)")]
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in lines))
    assert [q.answer for q in load_questions(p)] == ["B"] * 4


@pytest.mark.parametrize("line, needle", [
    ('{"image": "i.png", "question": "q"}', "q.jsonl:1: missing 'answer'"),
    ('{"image": "i.png", "question": "q", "answer": "x", "choices": ["a", "b"]}', "not one of the 2 choices"),
    ('{"image": "nope.png", "question": "q", "answer": "x"}', "not found"),
    ('not json', "q.jsonl:1"),
])
def test_bad_questions_file_is_one_line_error(tmp_path, line, needle):
    from conftest import assert_one_line_error
    from llava_local.cli.main import main
    p = tmp_path / "q.jsonl"
    p.write_text(line + "\n")
    res = CliRunner().invoke(main, ["eval", "-q", str(p), "--model", str(tmp_path)])
    assert_one_line_error(res, needle)


# --- end to end on the tiny model ---

@pytest.fixture(scope="module")
def questions_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalq")
    for i in range(2):
        random_image(64, 48, seed=10 + i).save(root / f"img{i}.png")
    rows = [{"id": "em", "image": "img0.png", "question": "What is it?", "answer": "A cat."},
            {"id": "mc", "image": "img1.png", "question": "Which animal?", "choices": CHOICES, "answer": "B"},
            {"id": "judged", "image": "img1.png", "question": "Describe it.", "answer": "Random noise.",
             "category": "detail", "context": "Random coloured noise.\nnoise: [0.000, 0.000, 1.000, 1.000]"}]
    (root / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    (root / "judged.jsonl").write_text(json.dumps(rows[2]) + "\n")
    return root


def test_eval_cli_end_to_end(pair_f32, questions_file, tmp_path):
    from llava_local.cli.main import main
    report = tmp_path / "report.md"
    res = CliRunner().invoke(main, ["eval", "--model", str(pair_f32.llm_path), "--mmproj", str(pair_f32.mmproj_path),
                                    "-q", str(questions_file / "q.jsonl"), "--threads", "1", "--max-tokens", "4",
                                    "--vision-backend", "torch", "--report", str(report), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 2 and 0.0 <= out["accuracy"] <= 1.0
    assert [it["id"] for it in out["items"]] == ["em", "mc"]
    assert all(isinstance(it["correct"], bool) for it in out["items"])
    text = report.read_text()
    assert "| em |" in text and "| mc |" in text and "A. a cat" in text


@needs_smollm2
def test_eval_cli_judged(pair_f32, questions_file):
    """The judge (SmolLM2) runs; its item ends up scored or listed as unscored, never dropped."""
    from llava_local.cli.main import main
    res = CliRunner().invoke(main, ["eval", "--model", str(pair_f32.llm_path), "--mmproj", str(pair_f32.mmproj_path),
                                    "-q", str(questions_file / "judged.jsonl"), "--threads", "1", "--max-tokens", "4",
                                    "--vision-backend", "torch", "--judge", str(SMOLLM2_GGUF),
                                    "--judge-max-tokens", "12", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    item = out["items"][0]
    assert (item["scores"] is None) != (item["unscored"] is None)
    assert out["per_category"]["detail"]["n"] == 1


def test_shapes_eval_matches_bench_script(pair_f32):
    """`llava-local eval --shapes N` and bench/eval_shapes.py: same questions, same answers, same figure."""
    import importlib.util

    from llava_local.cli.main import main
    from train.tiny_models import REPO
    spec = importlib.util.spec_from_file_location("eval_shapes", REPO / "bench" / "eval_shapes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ref = bench.evaluate(pair_f32.llm_path.parent, n_images=2, threads=1, progress=False)
    res = CliRunner().invoke(main, ["eval", "--model", str(pair_f32.llm_path.parent), "--shapes", "2",
                                    "--threads", "1", "--vision-backend", "torch", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    ours = {it["id"]: it for it in out["items"]}
    assert len(ours) == sum(v["n"] for v in ref["per_kind"].values())
    for kind, v in ref["per_kind"].items():
        assert out["per_category"][kind]["accuracy"] == pytest.approx(v["accuracy"])
    for row in ref["errors"]:                       # every wrong answer: the very same text
        assert ours[row["id"]]["prediction"] == row["prediction"] and ours[row["id"]]["correct"] is False
    assert out["accuracy"] == pytest.approx(ref["accuracy"])           # the headline figure, reasoning apart


def test_eval_package_imports_neither_train_nor_convert():
    """llava_local/eval is a job over the runtime: the CLI hands in what comes from train/ and convert/."""
    import ast

    from train.tiny_models import REPO
    for path in sorted((REPO / "llava_local" / "eval").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("train", "convert"), f"{path.name} imports {name}"
