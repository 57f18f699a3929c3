"""Evaluation questions: the JSONL file `llava-local eval -q` reads, its checks, and the
multiple-choice prompt and answer parser.

    qs = load_questions("qa.jsonl")                      # LlavaLocalError naming file:line on bad input
    check_questions(qs, Path("qa-images/"), judged=False)  # every image exists, before a model loads
    prompt = mc_prompt(q.question, q.choices)            # LLaVA-1.5's ScienceQA layout
    letter = parse_choice("The answer is (B).", q.choices)   # "B"; None when no letter or a hedge

Questions are JSONL, one object per line:
    {"image": "img.png", "question": "...", "answer": "..."}                     exact match
    {"image": ..., "question": ..., "choices": ["..", ".."], "answer": "B"}      multiple choice
    {"image": ..., "question": ..., "answer": <reference>, "context": "<captions + boxes>",
     "category": "conversation" | "detail" | "reasoning"}                         judged (--judge)
"id" is optional. The gold answer of a multiple-choice item may be a letter, an index or the
choice's text; it is stored as its letter.

Multiple choice follows LLaVA-1.5's ScienceQA prompt (lettered options, "Answer with the option's
letter from the given choices directly."); an answer with no letter, or with two different ones,
is wrong, never guessed.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llava_local.errors import LlavaLocalError
from llava_local.scoring import normalize_answer

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."   # LLaVA-1.5 ScienceQA


@dataclass
class Question:
    id: str
    image: str
    question: str
    answer: str                      # gold text; for multiple choice the gold letter
    choices: list[str] | None = None
    category: str = ""               # conversation / detail / reasoning (judged); a kind (shapes)
    context: str | None = None       # the image as text, for the judge


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
            if normalize_answer(c) == normalize_answer(answer):
                return LETTERS[i]
    raise ValueError(f"answer {answer!r} is not one of the {len(choices)} choices (letter, index or text)")


def _question(n: int, d) -> Question:
    """Line `n` of a questions file, parsed; ValueError says what is wrong with it."""
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
    return Question(str(d.get("id", n)), str(d["image"]), str(d["question"]), answer, choices,
                    str(d.get("category", "")), d.get("context"))


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
            out.append(_question(n, json.loads(line)))
        except ValueError as exc:      # json.JSONDecodeError is a ValueError
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
        if judged:
            require_context(q)


def require_context(q: Question) -> str:
    """The judge reads the image as text: a judged item without it cannot be scored."""
    if not (q.context and q.context.strip()):
        raise LlavaLocalError(f"question {q.id}: judged scoring needs a 'context' (the image as text)")
    return q.context


# --- multiple choice ---

def mc_prompt(question: str, choices: Sequence[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question}\n{options}\n{MC_INSTRUCTION}"


def prompt_of(q: Question) -> str:
    """What the model is asked: the question, or for multiple choice the lettered prompt."""
    return mc_prompt(q.question, q.choices) if q.choices else q.question


def parse_choice(text: str, choices: Sequence[str]) -> str | None:
    """The letter an answer picks, or None (no letter, or two different ones)."""
    valid = LETTERS[:len(choices)]
    t = text.strip()
    if not t:
        return None
    # the choice's text as the whole first line (first: "A dog." is choice text, not the letter A)
    first = normalize_answer(t.splitlines()[0])
    hits = {LETTERS[i] for i, c in enumerate(choices) if normalize_answer(c) == first}
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
