"""The teacher's text -> LLaVA records: parsing the kind's format, trimming output cut off by
max_tokens, validating records and finding duplicates.

    turns = parse_teacher_output("conversation", text, random.Random(seed))   # [(question, answer)]
    rec = build_record("42-conversation", "000042.jpg", turns)
    validate_record(rec)       # [] or the problems that keep it out of the dataset
    dedup_key(rec)             # equal for the same image and the same normalised text

A valid record has alternating non-empty turns, `<image>` once, in the first human turn, no chat
template control text, and no leaked coordinates or "caption" talk (data must read as if the image
were seen).
"""
from __future__ import annotations

import hashlib
import random
import re

from llava_local.prompts.templates import IMAGE_MARKER

from .datagen_prompts import DETAIL_INSTRUCTIONS

MAX_TURN_CHARS = 2000          # a turn longer than this is a runaway generation, not data
MIN_ANSWER_WORDS = 2
# Chat-template control text a small teacher may echo: never training data.
FORBIDDEN = ("<|im_start|>", "<|im_end|>", "</s>", "<s>", "<|endoftext|>", "[INST]", "USER:", "ASSISTANT:")


# --- parsing the teacher's output ---

class ParseError(ValueError):
    """The teacher's text does not have the kind's format (the task is rejected with this reason)."""


_LABEL = re.compile(r"^\s*(?:[-*\d.)\s]*)\**\s*(question|q|user|human|answer|a|gpt|assistant)\s*\d*\s*\**\s*[:：]\s*\**\s*",
                    re.IGNORECASE)
_Q_LABELS = {"question", "q", "user", "human"}


def parse_qa_pairs(text: str) -> list[tuple[str, str]]:
    """'Question: ... Answer: ...' blocks -> [(q, a)]; lines without a label continue the current one."""
    pairs: list[list[str]] = []
    current: str | None = None              # "q" or "a"
    for raw in text.replace("===", "\n").splitlines():
        m = _LABEL.match(raw)
        if m:
            is_q = m.group(1).lower() in _Q_LABELS
            rest = raw[m.end():].strip()
            if is_q:
                if current == "q":
                    raise ParseError("a question without an answer")
                pairs.append([rest, ""])
                current = "q"
            else:
                if current != "q":
                    raise ParseError("an answer without a question")
                pairs[-1][1] = rest
                current = "a"
        elif raw.strip() and current is not None:
            i = 0 if current == "q" else 1
            pairs[-1][i] = (pairs[-1][i] + " " + raw.strip()).strip()
    if not pairs:
        raise ParseError("no 'Question:' / 'Answer:' pairs")
    if current == "q":
        if len(pairs) == 1:
            raise ParseError("the question has no answer")
        pairs.pop()               # a trailing unanswered question (the teacher ran on): drop it
    return [(q.strip(), a.strip()) for q, a in pairs]


def parse_teacher_output(kind: str, text: str, rng: random.Random) -> list[tuple[str, str]]:
    """The teacher's text -> (question, answer) turns of the kind; ParseError if it is off-format."""
    text = text.strip()
    if not text:
        raise ParseError("empty output")
    if kind == "detail":
        if _LABEL.match(text) or re.search(r"^\s*(question|answer)\s*:", text, re.I | re.M):
            raise ParseError("a Q/A block where a description was asked for")
        return [(rng.choice(DETAIL_INSTRUCTIONS), " ".join(text.split()))]
    pairs = parse_qa_pairs(text)
    if kind == "reasoning":
        pairs = pairs[:1]        # one question per reasoning item (extra pairs are the teacher rambling)
    seen, out = set(), []
    for q, a in pairs:           # a small teacher repeats itself: keep the first of equal questions
        key = _norm(q)
        if key not in seen:
            seen.add(key)
            out.append((q, a))
    return out


def trim_truncated(kind: str, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The teacher hit max_tokens: drop the cut-off last pair of a conversation, cut a description
    or an answer back to its last full sentence; ParseError where nothing whole is left."""
    if kind == "conversation" and len(turns) > 1:
        return turns[:-1]
    q, a = turns[-1]
    end = max(a.rfind(". "), a.rfind("! "), a.rfind("? "), *(i for i in [len(a) - 1] if a[-1:] in ".!?"))
    if end < 0:
        raise ParseError("truncated by max_tokens with no complete sentence")
    return turns[:-1] + [(q, a[:end + 1].strip())]


# --- records: building, validating, deduplicating ---

def build_record(rid: str, image: str, turns: list[tuple[str, str]]) -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": (IMAGE_MARKER + "\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conv}


def validate_record(rec: dict) -> list[str]:
    """Problems that keep a record out of the dataset (empty list: valid LLaVA JSON for train/data.py)."""
    problems = []
    if not isinstance(rec, dict):
        return ["not an object"]
    if not isinstance(rec.get("id"), str) or not rec["id"]:
        problems.append("missing id")
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        problems.append("missing image")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        return problems + ["conversations must be a non-empty list of human/gpt pairs"]
    for i, turn in enumerate(conv):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            problems.append(f"turn {i}: expected from={want!r}")
            continue
        value = turn.get("value")
        if not isinstance(value, str) or not value.replace(IMAGE_MARKER, "").strip():
            problems.append(f"turn {i}: empty")
            continue
        if len(value) > MAX_TURN_CHARS:
            problems.append(f"turn {i}: longer than {MAX_TURN_CHARS} characters")
        n_markers = value.count(IMAGE_MARKER)
        if i == 0 and n_markers != 1:
            problems.append(f"turn 0: {n_markers} {IMAGE_MARKER} markers (need exactly 1)")
        if i > 0 and n_markers:
            problems.append(f"turn {i}: {IMAGE_MARKER} outside the first human turn")
        if any(f in value for f in FORBIDDEN):
            problems.append(f"turn {i}: chat-template control text")
        if want == "gpt" and len(value.split()) < MIN_ANSWER_WORDS:
            problems.append(f"turn {i}: answer shorter than {MIN_ANSWER_WORDS} words")
        if want == "gpt" and re.search(r"^\s*(question|answer)\s*:", value, re.I | re.M):
            problems.append(f"turn {i}: Q/A labels inside an answer")
        if _LEAK.search(value):
            problems.append(f"turn {i}: mentions the text it was written from (coordinates, captions)")
    return problems


# The paper's prompts forbid it: data must read as if the image were seen, not the boxes' text.
_LEAK = re.compile(r"\d\.\d{3}|\bbounding box|\bcoordinates?\b|\bcaptions?\b", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.replace(IMAGE_MARKER, "").lower()).split())


def dedup_key(rec: dict) -> str:
    """Same image and same normalised text (case, punctuation, spacing ignored): a duplicate."""
    body = "\x1f".join(_norm(t["value"]) for t in rec["conversations"])
    return hashlib.sha1(f"{rec['image']}\x1e{body}".encode()).hexdigest()
