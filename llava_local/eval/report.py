"""The Markdown report of an evaluation (`llava-local eval --report report.md`): the headline
figures, a table per category, the unscored judged items with the judge's reply, and every item.

    Path("report.md").write_text(markdown_report(evaluate(engine, questions)))
"""
from __future__ import annotations

from pathlib import Path

from llava_local.eval.evaluate import EvalResult, ItemResult
from llava_local.eval.questions import prompt_of


def _cell(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", "<br>")


def _result(it: ItemResult) -> str:
    if it.scores is not None:
        return f"{it.scores[1]:g} vs {it.scores[0]:g}"
    if it.unscored is not None:
        return f"unscored ({it.unscored})"
    if it.question.choices:
        return f"{'✓' if it.correct else '✗'} picked {it.picked or '—'}"
    return "✓" if it.correct else "✗"


def markdown_report(res: EvalResult, title: str = "llava-local eval") -> str:
    lines = [f"# {title}", ""]
    for k, v in res.meta.items():
        lines.append(f"- {k}: {v}")
    acc = res.accuracy()
    if acc is not None:
        counted = res.graded()
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
        lines.append(f"| {_cell(q.id)} | {_cell(q.category)} | {_cell(Path(q.image).name)} | {_cell(prompt_of(q))} "
                     f"| {_cell(q.answer)} | {_cell(it.prediction)} | {_result(it)} |")
    return "\n".join(lines) + "\n"
