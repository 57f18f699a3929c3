"""Scoring a LLaVA model: exact match, multiple choice, and LLaVA-Bench-style judged scores.

    llava-local eval --model out/ --questions qa.jsonl --report report.md
    llava-local eval --shapes 100                      # the demo model on the held-out shapes set
    llava-local eval --model out/ --questions bench.jsonl --judge judge.gguf

Questions are JSONL, one object per line:
    {"image": "img.png", "question": "...", "answer": "..."}                     exact match
    {"image": ..., "question": ..., "choices": ["..", ".."], "answer": "B"}      multiple choice
    {"image": ..., "question": ..., "answer": <reference>, "context": "<captions + boxes>",
     "category": "conversation" | "detail" | "reasoning"}                         judged (--judge)
"id" is optional. Exact match compares after train/shapes.py's `normalize_answer` (case, trailing
punctuation, a leading article, number words), so `--shapes N` gives bench/eval_shapes.py's figure:
the same held-out records, greedy decoding, 16 new tokens.

Multiple choice follows LLaVA-1.5's ScienceQA prompt (lettered options, "Answer with the option's
letter from the given choices directly."); the letter is parsed from the answer (`parse_choice`),
and an answer with no letter, or with two different ones, is wrong, never guessed.

Judged scoring follows the paper's LLaVA-Bench: a text-only judge reads the image as text, the
question, the reference answer (Assistant 1) and the model's (Assistant 2) and rates both 1-10 on
its first line. Per category the relative score is 100 * mean(model) / mean(reference). A judge
reply without exactly one consistent pair of scores in 1..10 leaves the item *unscored*: counted,
listed with the reason, and out of the means (`parse_judge_scores`).
"""
from __future__ import annotations

import json
import re
import string
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from llava_local.errors import LlavaLocalError
from llava_local.runtime.sampling import SamplingParams
from llava_local.prompts.templates import Message

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."   # LLaVA-1.5 ScienceQA
CATEGORIES = ("conversation", "detail", "reasoning")


# --- questions ---

@dataclass
class Question:
    id: str
    image: str
    question: str
    answer: str                      # gold text; for multiple choice the gold letter
    choices: list[str] | None = None
    category: str = ""               # conversation / detail / reasoning (judged); a kind (shapes)
    context: str | None = None       # the image as text, for the judge


def _normalize(text: str) -> str:
    from train.shapes import normalize_answer
    return normalize_answer(text)


def exact_match(prediction: str, answer: str) -> bool:
    """train/shapes.py's exact match (the training issue's scorer): one definition for both."""
    from train.shapes import exact_match as em
    return em(prediction, answer)


def gold_letter(answer, choices: list[str]) -> str:
    """The gold answer of a multiple-choice item as a letter: given as a letter, an index or the choice text."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return LETTERS[answer]
    elif isinstance(answer, str):
        a = answer.strip().rstrip(".").strip("()")
        if len(a) == 1 and a.upper() in LETTERS[:len(choices)]:
            return a.upper()
        for i, c in enumerate(choices):
            if _normalize(c) == _normalize(answer):
                return LETTERS[i]
    raise ValueError(f"answer {answer!r} is not one of the {len(choices)} choices (letter, index or text)")


def load_questions(path: str | Path) -> list[Question]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LlavaLocalError(f"{path}: cannot read questions ({exc})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            for k in ("image", "question", "answer"):
                if k not in d:
                    raise ValueError(f"missing {k!r}")
            choices = d.get("choices")
            if choices is not None:
                if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                        and all(isinstance(c, str) for c in choices)):
                    raise ValueError("'choices' must be a list of 2-26 strings")
                answer = gold_letter(d["answer"], choices)
            else:
                answer = str(d["answer"])
            out.append(Question(str(d.get("id", n)), str(d["image"]), str(d["question"]), answer, choices,
                                str(d.get("category", "")), d.get("context")))
        except ValueError as exc:
            raise LlavaLocalError(f"{path}:{n}: {exc}") from None
    if not out:
        raise LlavaLocalError(f"{path}: no questions")
    return out


def check_questions(questions: Sequence[Question], image_root: Path, *, judged: bool) -> None:
    """Fail before any model loads: every image exists; judged items carry their context."""
    for q in questions:
        path = Path(q.image) if Path(q.image).is_absolute() else Path(image_root) / q.image
        if not path.is_file():
            raise LlavaLocalError(f"question {q.id}: image {path} not found (wrong --images?)")
        if judged and not (q.context and q.context.strip()):
            raise LlavaLocalError(f"question {q.id}: judged scoring needs a 'context' (the image as text)")


def shapes_questions(n_images: int, seed: int, root: Path) -> list[Question]:
    """bench/eval_shapes.py's held-out set (train/shapes.py `eval_records`), images written under root."""
    from train.shapes import eval_records, write_eval_images
    records = eval_records(n_images, seed)
    write_eval_images(records, root)
    return [Question(r["id"], str(root / r["image"]), r["question"], r["answer"], None, r["kind"])
            for r in records]


# --- multiple choice ---

def mc_prompt(question: str, choices: Sequence[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\n{MC_INSTRUCTION}"


def parse_choice(text: str, choices: Sequence[str]) -> str | None:
    """The letter an answer picks, or None (no letter, or two different ones)."""
    valid = LETTERS[:len(choices)]
    t = text.strip()
    if not t:
        return None
    # the choice's text as the whole first line (first: "A dog." is choice text, not the letter A)
    first = _normalize(t.splitlines()[0])
    hits = {LETTERS[i] for i, c in enumerate(choices) if _normalize(c) == first}
    if len(hits) == 1:
        return hits.pop()
    # "B", "B.", "(B)", "B) ...", "B: ...", "Answer: B", "The answer is (B)."
    patterns = (rf"^\(?([{valid}])\)?(?:[.):,]|\s|$)",
                rf"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([{valid}])\)?(?![\w])")
    # capital letters standing alone ("A" before a lowercase word is the article): two of them is a hedge
    mentioned = set(re.findall(rf"\b([{valid}])\b(?! [a-z])", t))
    for p in patterns:
        found = {m.upper() for m in re.findall(p, t, flags=0 if p.startswith("^") else re.IGNORECASE)}
        if len(found) == 1 and not (mentioned - found):
            return found.pop()
        if found:
            return None
    # a lone letter in parentheses anywhere: "... so (C)"
    found = set(re.findall(rf"\(([{valid}])\)", t))
    return found.pop() if len(found) == 1 else None


# --- the judge ---

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# The paper's LLaVA-Bench rule (llava/eval/table/rule.json, "llava_bench_*"), unchanged in substance.
JUDGE_RULE = ("We would like to request your feedback on the performance of two AI assistants in response to the "
              "user question displayed above. The user asks the question on observing an image. For your "
              "reference, the visual content in the image is represented with a few sentences describing the "
              "image.\nPlease rate the helpfulness, relevance, accuracy, level of details of their responses. "
              "Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
              "better overall performance.\nPlease first output a single line containing only two values "
              "indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a "
              "space.\nIn the subsequent line, please provide a comprehensive explanation of your evaluation, "
              "avoiding any potential bias and ensuring that the order in which the responses were presented "
              "does not affect your judgment.")


def judge_messages(context: str, question: str, reference: str, answer: str) -> list[Message]:
    user = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_RULE}\n\n")
    return [Message("system", JUDGE_SYSTEM), Message("user", user)]


@dataclass(frozen=True)
class JudgeVerdict:
    scores: tuple[float, float] | None     # (reference, model); None: unscored
    reason: str = ""                       # why unscored


_NUM = r"(10(?:\.0+)?|[0-9](?:\.\d+)?)"
_PAIR_LINE = re.compile(rf"^\s*\**\s*(?:scores?\s*:?\s*)?\[?\s*{_NUM}\s*(?:/\s*10)?\s*(?:,|\s|/|and|-)\s*{_NUM}"
                        rf"\s*(?:/\s*10)?\s*\]?\s*\**\s*\.?\s*$", re.IGNORECASE)
_LABELLED = re.compile(rf"assistant\s*([12])\s*(?:'s)?\s*(?:score|rating)?\s*(?:[:=\-]|is|gets|receives|scores?)"
                       rf"\s*(?:a\s+(?:score|rating)\s+of\s+)?{_NUM}(?:\s*/\s*10|\s*out of 10)?(?![\d.]*\d)",
                       re.IGNORECASE)


def parse_judge_scores(text: str) -> JudgeVerdict:
    """Scores (reference, model) from a judge reply. Accepted: lines that hold exactly two numbers
    ("8 6", "8, 6", "8/10 6/10") and labelled scores ("Assistant 1: 8", "Assistant 2 receives 6").
    Every accepted statement must agree, with both numbers in [1, 10]; otherwise unscored."""
    if not text or not text.strip():
        return JudgeVerdict(None, "empty reply")
    pairs: set[tuple[float, float]] = set()
    for line in text.splitlines():
        m = _PAIR_LINE.match(line)
        if m:
            pairs.add((float(m.group(1)), float(m.group(2))))
    labelled: dict[str, set[float]] = defaultdict(set)
    for who, num in _LABELLED.findall(text):
        labelled[who].add(float(num))
    if labelled:
        if len(labelled["1"]) > 1 or len(labelled["2"]) > 1:
            return JudgeVerdict(None, "conflicting scores for one assistant")
        if labelled["1"] and labelled["2"]:
            pairs.add((labelled["1"].pop(), labelled["2"].pop()))
        elif not pairs:
            return JudgeVerdict(None, "a score for only one assistant")
    if not pairs:
        return JudgeVerdict(None, "no score")
    if len(pairs) > 1:
        return JudgeVerdict(None, "conflicting scores: " + "; ".join(f"{a:g} {b:g}" for a, b in sorted(pairs)))
    ref, model = pairs.pop()
    if not (1 <= ref <= 10 and 1 <= model <= 10):
        return JudgeVerdict(None, f"score out of 1-10: {ref:g} {model:g}")
    return JudgeVerdict((ref, model))


# --- running ---

@dataclass
class ItemResult:
    question: Question
    prediction: str
    correct: bool | None = None               # exact match / multiple choice
    picked: str | None = None                 # multiple choice: the parsed letter
    scores: tuple[float, float] | None = None # judged: (reference, model)
    unscored: str | None = None               # judged: why the judge's reply gave no scores
    judge_reply: str = ""


@dataclass
class EvalResult:
    items: list[ItemResult]
    seconds: float
    meta: dict = field(default_factory=dict)
    headline_kinds: tuple[str, ...] | None = None   # categories the overall accuracy counts (None: all)

    def accuracy(self, kinds: Sequence[str] | None = None) -> float | None:
        kinds = kinds or self.headline_kinds
        xs = [it.correct for it in self.items if it.correct is not None
              and (kinds is None or it.question.category in kinds)]
        return sum(xs) / len(xs) if xs else None

    def per_category(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        groups: dict[str, list[ItemResult]] = defaultdict(list)
        for it in self.items:
            groups[it.question.category or "all"].append(it)
        for cat, items in groups.items():
            d: dict = {"n": len(items)}
            graded = [it.correct for it in items if it.correct is not None]
            if graded:
                d["accuracy"] = sum(graded) / len(graded)
            judged = [it for it in items if it.scores is not None or it.unscored is not None]
            if judged:
                scored = [it.scores for it in judged if it.scores is not None]
                d["scored"], d["unscored"] = len(scored), len(judged) - len(scored)
                if scored:
                    ref = sum(s[0] for s in scored) / len(scored)
                    mod = sum(s[1] for s in scored) / len(scored)
                    d["reference_mean"], d["model_mean"] = ref, mod
                    d["relative_score"] = 100.0 * mod / ref
            out[cat] = d
        return out

    def relative_score(self) -> float | None:
        """Overall: 100 * mean(model) / mean(reference) over every scored item."""
        scored = [it.scores for it in self.items if it.scores is not None]
        if not scored:
            return None
        return 100.0 * sum(s[1] for s in scored) / sum(s[0] for s in scored)

    def unscored(self) -> list[ItemResult]:
        return [it for it in self.items if it.unscored is not None]

    def to_json(self) -> dict:
        return {**self.meta, "n": len(self.items), "accuracy": self.accuracy(),
                "relative_score": self.relative_score(), "per_category": self.per_category(),
                "seconds": round(self.seconds, 1),
                "unscored": [{"id": it.question.id, "reason": it.unscored} for it in self.unscored()],
                "items": [{"id": it.question.id, "category": it.question.category, "question": it.question.question,
                           "answer": it.question.answer, "prediction": it.prediction, "correct": it.correct,
                           "picked": it.picked, "scores": it.scores, "unscored": it.unscored}
                          for it in self.items]}


def evaluate(engine, questions: Sequence[Question], *, image_root: Path | None = None, max_tokens: int = 64,
             sampling: SamplingParams = SamplingParams(), judge=None, judge_max_tokens: int = 48,
             on_item: Callable[[ItemResult], None] | None = None) -> EvalResult:
    """Ask every question through `engine` (llava_local.runtime.engine.Engine); grade, or have `judge`
    (a text_generation.TextGenerator) rate it when the question has a context."""
    t0 = time.perf_counter()
    items = []
    for q in questions:
        image = Path(q.image) if image_root is None or Path(q.image).is_absolute() else Path(image_root) / q.image
        prompt = mc_prompt(q.question, q.choices) if q.choices else q.question
        pred = engine.ask(prompt, [image], max_tokens=max_tokens, sampling=sampling).text.strip()
        it = ItemResult(q, pred)
        if judge is not None:
            if not q.context:
                raise LlavaLocalError(f"question {q.id}: judged scoring needs a 'context' (the image as text)")
            it.judge_reply = judge.generate(judge_messages(q.context, q.question, q.answer, pred),
                                            max_tokens=judge_max_tokens)
            verdict = parse_judge_scores(it.judge_reply)
            it.scores, it.unscored = verdict.scores, (verdict.reason if verdict.scores is None else None)
        elif q.choices:
            it.picked = parse_choice(pred, q.choices)
            it.correct = it.picked == q.answer
        else:
            it.correct = exact_match(pred, q.answer)
        items.append(it)
        if on_item:
            on_item(it)
    return EvalResult(items, time.perf_counter() - t0)


# --- the report ---

def _cell(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", "<br>")


def markdown_report(res: EvalResult, title: str = "llava-local eval") -> str:
    lines = [f"# {title}", ""]
    for k, v in res.meta.items():
        lines.append(f"- {k}: {v}")
    acc = res.accuracy()
    if acc is not None:
        counted = [i.correct for i in res.items if i.correct is not None
                   and (res.headline_kinds is None or i.question.category in res.headline_kinds)]
        over = f" over {', '.join(res.headline_kinds)}" if res.headline_kinds else ""
        lines.append(f"- accuracy: **{acc:.1%}** ({sum(counted)}/{len(counted)}{over})")
    rel = res.relative_score()
    if rel is not None:
        lines.append(f"- relative score (judged): **{rel:.1f}**")
    lines.append(f"- time: {res.seconds:.1f}s")
    lines += ["", "## Per category", "", "| category | n | accuracy | scored | unscored | model mean | reference mean | relative |",
              "|---|---|---|---|---|---|---|---|"]
    for cat, d in res.per_category().items():
        f = lambda key, fmt: format(d[key], fmt) if key in d else ""   # noqa: E731
        lines.append(f"| {cat} | {d['n']} | {f('accuracy', '.1%')} | {d.get('scored', '')} | {d.get('unscored', '')} "
                     f"| {f('model_mean', '.2f')} | {f('reference_mean', '.2f')} | {f('relative_score', '.1f')} |")
    if res.unscored():
        lines += ["", "## Unscored (judge reply without one consistent pair of scores)", ""]
        lines += [f"- `{it.question.id}`: {it.unscored} — reply: {_cell(it.judge_reply[:200])}" for it in res.unscored()]
    lines += ["", "## Items", "", "| id | category | image | question | reference | answer | result |",
              "|---|---|---|---|---|---|---|"]
    for it in res.items:
        q = it.question
        if it.scores is not None:
            result = f"{it.scores[1]:g} vs {it.scores[0]:g}"
        elif it.unscored is not None:
            result = f"unscored ({it.unscored})"
        elif q.choices:
            result = f"{'✓' if it.correct else '✗'} picked {it.picked or '—'}"
        else:
            result = "✓" if it.correct else "✗"
        question = mc_prompt(q.question, q.choices) if q.choices else q.question
        lines.append(f"| {_cell(q.id)} | {_cell(q.category)} | {_cell(Path(q.image).name)} | {_cell(question)} "
                     f"| {_cell(q.answer)} | {_cell(it.prediction)} | {result} |")
    return "\n".join(lines) + "\n"
