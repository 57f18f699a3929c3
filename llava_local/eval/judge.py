"""LLaVA-Bench-style judged scoring: a text-only judge LLM rates the reference and the model's answer.

    judge = Judge.load("judge.gguf", threads=4, max_tokens=48)     # a TextGenerator underneath
    reply, verdict = judge.rate(question, "a red circle")           # question: questions.Question
    verdict.scores                                                  # (reference, model), or None
    judge.close()

As in the paper's LLaVA-Bench, the judge reads the image as text (the question's `context`), the
question, the reference answer (Assistant 1) and the model's (Assistant 2), and rates both 1-10 on
its first line. A reply without exactly one consistent pair of scores in 1..10 leaves the item
*unscored*: counted, listed with the reason, and out of the means (`parse_judge_scores`).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass

from llava_local.eval.questions import Question, require_context
from llava_local.prompts.templates import Message

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


class Judge:
    """Runs the judge: `generator` is anything with `generate(messages, max_tokens=) -> str` and
    `close()` (runtime.text_generation.TextGenerator; tests may hand in a fake)."""

    def __init__(self, generator, *, max_tokens: int = 48):
        self.generator = generator
        self.max_tokens = max_tokens       # the scores come first: a few dozen tokens hold them

    @classmethod
    def load(cls, path: str | os.PathLike, *, threads: int | None = None, verbose: bool = False,
             max_tokens: int = 48) -> "Judge":
        """A judge on a local GGUF LLM, prompted with its own chat template."""
        from llava_local.runtime.text_generation import TextGenerator
        return cls(TextGenerator(path, threads=threads, verbose=verbose), max_tokens=max_tokens)

    def rate(self, q: Question, answer: str) -> tuple[str, JudgeVerdict]:
        """The judge's reply on `answer` to `q` against q's reference answer, and the scores read from it."""
        reply = self.generator.generate(judge_messages(require_context(q), q.question, q.answer, answer),
                                        max_tokens=self.max_tokens)
        return reply, parse_judge_scores(reply)

    def close(self) -> None:
        self.generator.close()
