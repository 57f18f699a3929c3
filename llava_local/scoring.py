"""The exact-match scorer of short answers: what the shapes held-out evaluation, `llava-local eval`
and the training data's own checks count as right. Bottom layer: train/ and eval/ both use it.

    exact_match("Two.", "2")      # True: case, punctuation, a leading article, number words
"""
from __future__ import annotations

NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4"}   # the shapes data counts to four


def normalize_answer(text: str) -> str:
    """Case, surrounding space, trailing punctuation, a leading article and number words do not count."""
    t = " ".join(text.strip().lower().split()).rstrip(".!?,;: ").strip()
    for art in ("a ", "an ", "the "):
        if t.startswith(art):
            t = t[len(art):]
            break
    return NUMBERS.get(t, t)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)
