"""The quantization report of `llava-local eval-quant`: one row per LLM type, as a Markdown table
(with notes on how each column was measured) and as a PNG plot of file size against agreement.

    report = evaluate_quants(...)                  # quant_eval.py
    print(markdown_table(report, command="llava-local eval-quant out/"))
    plot_report(report, "quant.png")
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class QuantRow:
    qtype: str
    is_source: bool
    size_bytes: int
    bits_per_weight: float         # tensor data bits / weights (metadata such as the vocabulary excluded)
    load_s: float
    decode_tok_s: float
    agreement: float               # top-1 agreement with the source over teacher-forced tokens
    accuracy: float | None         # shapes exact match, None when not measured


@dataclass
class QuantReport:
    model: str                     # model directory
    llm: str                       # source LLM file name
    mmproj: str
    source_type: str               # F32 / F16 / BF16
    vision_backend: str
    n_answers: int
    n_tokens: int                  # teacher-forced positions compared
    answers_from: str              # "held-out shapes answers" | "greedy answers of the source LLM"
    n_shapes: int                  # shapes questions scored (0: not a shapes model, or skipped)
    gen_tokens: int
    timing_runs: int
    threads: int
    repack: bool                   # llama.cpp CPU weight repacking allowed
    rows: list[QuantRow]


def markdown_table(report: QuantReport, *, command: str | None = None) -> str:
    shapes = report.n_shapes > 0
    head = ["LLM type", "file (MB)", "bits/weight", "load (s)", "decode (tok/s)", "top-1 agreement"]
    head += ["shapes accuracy"] if shapes else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in report.rows:
        cells = [r.qtype, f"{r.size_bytes / 1e6:.1f}", f"{r.bits_per_weight:.2f}", f"{r.load_s:.3f}",
                 f"{r.decode_tok_s:.1f}", "reference" if r.is_source else f"{100 * r.agreement:.1f} %"]
        if shapes:
            cells.append(f"{100 * r.accuracy:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Model `{report.model}`: LLM `{report.llm}` quantized by llama.cpp (`llama_model_quantize`); "
        f"mmproj `{report.mmproj}` unchanged, images encoded once by the `{report.vision_backend}` vision backend.",
        f"Top-1 agreement: share of {report.n_tokens} teacher-forced answer tokens ({report.n_answers} "
        f"{report.answers_from}) where the quantized LLM's arg-max equals the {report.source_type} source's.",
        f"Load (model + context, file in the page cache) and decode: best of {report.timing_runs}; decode = "
        f"greedy generation of {report.gen_tokens} tokens after an image prompt, {report.threads} CPU "
        f"thread{'s' if report.threads > 1 else ''}, llama.cpp weight repacking "
        f"{'on' if report.repack else 'off'}. bits/weight counts tensor data only.",
    ]
    if shapes:
        notes.append(f"Shapes accuracy: exact match on {report.n_shapes} held-out questions (colour, shape, "
                     "count, position; as bench/eval_shapes.py scores them), greedy.")
    if command:
        notes.append(f"Command: `{command}`")
    return "\n".join(lines + notes) + "\n"


def plot_report(report: QuantReport, path: str | os.PathLike) -> Path:
    """PNG: LLM file size against top-1 agreement (and, below it, shapes accuracy); one marker per
    type, named in the legend (on a small model the quantized sizes crowd together: the
    vocabulary's embedding rows dominate and llama.cpp keeps them at higher precision)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(report.rows, key=lambda r: r.size_bytes)
    size = [r.size_bytes / 1e6 for r in rows]
    series = [(f"top-1 agreement with\nthe {report.source_type} source (%)", [100 * r.agreement for r in rows])]
    if report.n_shapes:
        series.append((f"shapes accuracy (%),\n{report.n_shapes} held-out questions",
                       [100 * (r.accuracy or 0.0) for r in rows]))
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 1.6 + 2.6 * len(series)), dpi=110, sharex=True,
                             squeeze=False)
    markers = "os^vD<>p*h"
    for ax, (label, ys) in zip(axes[:, 0], series):
        ax.plot(size, ys, "-", color="0.75", zorder=1)
        for i, (r, x, y) in enumerate(zip(rows, size, ys)):
            ax.scatter([x], [y], marker=markers[i % len(markers)], s=46, zorder=2, color=f"C{i}",
                       label=f"{r.qtype}  {r.size_bytes / 1e6:.1f} MB")
        ax.set_ylabel(label)
        ax.margins(x=0.06, y=0.2)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_title(f"Quantizations of {report.llm} ({report.n_tokens} teacher-forced answer tokens)",
                         fontsize=10)
    axes[0][0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1][0].set_xlabel("LLM file size (MB)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
