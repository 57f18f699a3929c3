"""Scoring a LLaVA model: exact match, multiple choice, and LLaVA-Bench-style judged scores.

    llava-local eval --model out/ --questions qa.jsonl --report report.md
    llava-local eval --shapes 100                      # the demo model on the held-out shapes set
    llava-local eval --model out/ --questions bench.jsonl --judge judge.gguf

    res = evaluate(engine, load_questions("qa.jsonl"), image_root=Path("."), max_tokens=64)
    res.accuracy(), res.per_category(), res.relative_score(), res.to_json()

Each question is asked through the engine (one image, a fresh conversation). Exact match compares
after llava_local/scoring.py's `normalize_answer` (case, trailing punctuation, a leading article,
number words): the scorer the shapes training data is checked with. A multiple-choice answer is
right when `parse_choice` reads the gold letter from it (questions.py). With a judge (judge.py)
each answer is rated against the reference instead; per category the relative score is
100 * mean(model) / mean(reference), and unscored items are counted, never averaged.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from llava_local.eval.judge import Judge
from llava_local.eval.questions import Question, parse_choice, prompt_of
from llava_local.runtime.sampling import SamplingParams
from llava_local.scoring import exact_match

CATEGORIES = ("conversation", "detail", "reasoning")     # LLaVA-Bench's judged categories


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

    def graded(self, kinds: Sequence[str] | None = None) -> list[bool]:
        """Right/wrong of every graded item of `kinds` (default: the headline kinds)."""
        kinds = kinds or self.headline_kinds
        return [it.correct for it in self.items if it.correct is not None
                and (kinds is None or it.question.category in kinds)]

    def accuracy(self, kinds: Sequence[str] | None = None) -> float | None:
        xs = self.graded(kinds)
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
             sampling: SamplingParams = SamplingParams(), judge: Judge | None = None,
             on_item: Callable[[ItemResult], None] | None = None) -> EvalResult:
    """Ask every question through `engine` (llava_local.runtime.engine.Engine); grade the answer, or
    have `judge` rate it (every question then needs a context)."""
    t0 = time.perf_counter()
    items = []
    for q in questions:
        image = Path(q.image) if image_root is None or Path(q.image).is_absolute() else Path(image_root) / q.image
        pred = engine.ask(prompt_of(q), [image], max_tokens=max_tokens, sampling=sampling).text.strip()
        it = ItemResult(q, pred)
        if judge is not None:
            it.judge_reply, verdict = judge.rate(q, pred)
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
