"""What each llama.cpp quantization of the LLM costs: file size, load time, decode speed, top-1
agreement with the unquantized (source) LLM over teacher-forced answers, and, for the shapes demo
model, exact-match accuracy on its held-out questions.

    from llava_local.eval.quant_eval import QuantEvalConfig, evaluate_quants, markdown_table, plot_report
    report = evaluate_quants("out/", QuantEvalConfig(types=("Q4_K_M", "Q8_0")))
    print(markdown_table(report)); plot_report(report, "quant.png")

CLI: `llava-local eval-quant out/ --report quant.md --plot quant.png`.

Method. MODEL_DIR holds an F32/F16/BF16 LLM + mmproj (+ manifest), e.g. a `convert` output. Every
image is encoded once, by the source mmproj (default vision backend `torch`, the exact one), and the
same embeddings feed every LLM: only the LLM's quantization varies. The source LLM is measured
first and is the reference: at each teacher-forced answer position, a quantized LLM "agrees" when
its arg-max token equals the source's. Answers are the shapes held-out answers for the demo model
(train/shapes.py), otherwise the source LLM's own greedy answers to fixed questions about rendered
shapes scenes. Prompts use the training layout (templates.py): user turn with the image, then the
answer and end-of-turn token as targets.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from llava_local.errors import ConversionError, ModelFilesError
from llava_local.runtime.llm import LlamaLLM
from llava_local.runtime.model_pair import ModelPair, resolve_pair
from llava_local.prompts.templates import IMAGE_MARKER, Message, tokenize_segments

from convert.quantize import QTYPES, quantize

log = logging.getLogger(__name__)

DEFAULT_TYPES = tuple(QTYPES)              # Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16
FT = gguf.LlamaFileType
SOURCE_FTYPES = {FT.ALL_F32: "F32", FT.MOSTLY_F16: "F16", FT.MOSTLY_BF16: "BF16"}   # unquantized general.file_type
# Questions for models other than the shapes demo; the images are rendered shapes scenes (nothing downloaded)
GENERIC_QUESTIONS = ("Describe the image.", "What colours do you see?", "How many objects are there?",
                     "What is in the top left corner?")
SHAPES_ANSWER_TOKENS = 16                  # bench/eval_shapes.py's limit: answers are a few words

Progress = Callable[[str, int, int], None]  # (stage, units done, units in all)


@dataclass
class QuantEvalConfig:
    types: tuple[str, ...] = DEFAULT_TYPES
    prompts: int | None = None     # teacher-forced answers; None: 100 held-out questions (shapes demo) or 16 generated
    answer_tokens: int = 32        # longest generated reference answer (models other than the shapes demo)
    gen_tokens: int = 64           # the timed greedy generation; end-of-turn ignored, so every type decodes as many
    timing_runs: int = 3           # load and decode are timed this many times, best kept (the machine may be shared)
    shapes: int = 400              # held-out shapes questions for task accuracy (shapes demo only; 0: skip).
                                   # 400 = the demo's 100 held-out images x 4 scored kinds
    vision_backend: str = "torch"  # encodes each image once, with the source mmproj
    threads: int | None = None     # llama.cpp threads (default: all cores)
    work_dir: str | None = None    # keep the quantized LLMs here (default: a temporary dir, each file deleted after use)
    repack: bool | None = None     # llama.cpp's CPU weight repacking (AMX, ...); None: on unless the once-per-CPU
                                   # probe saw it die with SIGILL (VMs that advertise AMX without enabling it)


@dataclass
class Case:
    items: list                    # prompt: token-id lists and image slots (-1 - index), as tokenize_segments makes
    image: int                     # row of the embeddings table
    target: list[int] = field(default_factory=list)   # teacher-forced answer tokens (answer + end of turn)
    answer: str = ""               # expected answer text (shapes accuracy)


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


# --- inputs ---

def source_type(pair: ModelPair) -> str:
    ftype = pair.llm.get("general.file_type")
    if ftype is None:   # older writers omit it: judge by the tensors
        F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
        kinds = {t.ggml_type for t in pair.llm.tensors.values()}
        ftype = FT.ALL_F32 if kinds <= {F32} else FT.MOSTLY_F16 if kinds <= {F32, F16} else -1
    if int(ftype) not in SOURCE_FTYPES:
        raise ModelFilesError(f"{pair.llm_path}: eval-quant needs an unquantized (F32/F16/BF16) LLM to quantize "
                              f"and compare against; this one has general.file_type {ftype}")
    return SOURCE_FTYPES[int(ftype)]


def shapes_held_out(pair: ModelPair) -> dict | None:
    """{"seed", "n_images"} of the held-out shapes split when the pair is the shapes demo model (or a
    conversion of its checkpoint), else None."""
    from train.demo_model import NAME, DemoConfig
    m = pair.manifest or {}
    if "shapes_eval" in m:
        return dict(m["shapes_eval"])
    if m.get("name") == NAME:
        return {"seed": DemoConfig.seed, "n_images": DemoConfig.n_eval}
    return None


def _tokenized(engine, question: str, answer: str | None) -> tuple[list, list[int]]:
    """Prompt items (and target ids) of one image + question turn, in the training layout."""
    msgs = [Message("user", IMAGE_MARKER + "\n" + question)]
    if answer is None:
        return engine.prompt_items(msgs), []
    segs = engine.template.segments(msgs + [Message("assistant", answer)])
    assert segs[-1].target, "the template must end with the answer"
    conv = tokenize_segments(segs, engine.llm.tokenize, engine.llm.bos, engine.llm.eos)
    return conv.items[:-1], conv.items[-1]


def _shapes_records(n_questions: int, seed: int) -> list[dict]:
    """The first `n_questions` scored held-out questions (EVAL_KINDS; 4 per image)."""
    from train.shapes import EVAL_KINDS, eval_records
    n_images = max(1, math.ceil(n_questions / len(EVAL_KINDS)))
    while True:   # eval_records is prefix-stable in n_images
        recs = [r for r in eval_records(n_images, seed) if r["kind"] in EVAL_KINDS]
        if len(recs) >= n_questions:
            return recs[:n_questions]
        n_images += 1


def _render(scene: dict):
    from train.shapes import render, scene_from_dict
    return render(scene_from_dict(scene))


# --- llama.cpp steps ---

@contextlib.contextmanager
def weight_repacking(enabled: bool | None):
    """Load models with (True) or without (False) llama.cpp's CPU "extra buffer types"
    (`use_extra_bufts`, weight repacking) for the duration; None keeps LlamaLLM's own choice (on
    unless the once-per-CPU probe saw them crash). LlamaLLM reads LLAVA_LOCAL_EXTRA_BUFTS at load."""
    from llava_local.runtime.extra_bufts_probe import ENV
    before = os.environ.get(ENV)
    if enabled is not None:
        os.environ[ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def prefill(llm: LlamaLLM, items: list, embeds: np.ndarray) -> int:
    """Evaluate prompt items on a fresh cache (image slot -1 - i takes embeds[i]); returns positions."""
    llm.reset()
    for it in items:
        if isinstance(it, list):
            if it:
                llm.eval_tokens(it)
        else:
            llm.eval_embeddings(embeds[-1 - it])
    return llm.n_past


def greedy(llm: LlamaLLM, max_tokens: int, *, stop: bool = True) -> tuple[list[int], bool]:
    """Greedy decoding after a prefill; returns (tokens, stopped at end of turn). The end-of-turn
    token is included; with stop=False decoding goes on past it (fixed-length timing)."""
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(np.argmax(llm.last_logits()))
        out.append(tok)
        if stop and llm.is_eog(tok):
            return out, True
        llm.eval_tokens([tok])
    return out, False


def teacher_forced_top1(llm: LlamaLLM, case: Case, embeds: np.ndarray) -> np.ndarray:
    """Arg-max token at each answer position, with the true answer fed in (teacher forcing)."""
    prefill(llm, case.items, embeds[case.image:case.image + 1])
    first = int(np.argmax(llm.last_logits()))
    if len(case.target) == 1:
        return np.array([first])
    llm.all_logits = True         # keep logits of the answer positions only, not of the image
    try:
        llm.eval_tokens(case.target[:-1])
        rest = llm.all_position_logits().argmax(-1)   # since prefill's reset: the answer positions only
    finally:
        llm.all_logits = False
    return np.concatenate([[first], rest])


def shapes_answer(llm: LlamaLLM, case: Case, embeds: np.ndarray) -> str:
    prefill(llm, case.items, embeds[case.image:case.image + 1])
    toks, stopped = greedy(llm, SHAPES_ANSWER_TOKENS)
    return llm.detokenize(toks[:-1] if stopped else toks).strip()


# --- the evaluation ---

@dataclass
class _Inputs:
    embeds: np.ndarray             # (n_images, n_tokens, n_embd), from the source mmproj
    agree: list[Case]
    shapes: list[Case]
    answers_from: str
    n_ctx: int


def _prepare(pair: ModelPair, cfg: QuantEvalConfig, held_out: dict | None, tick: Callable[[str], None]) -> _Inputs:
    from llava_local.runtime.engine import Engine
    gen_room = max(cfg.gen_tokens, cfg.answer_tokens, SHAPES_ANSWER_TOKENS)
    n_ctx = min(pair.n_ctx_train or 4096, pair.image_tokens + 256 + gen_room)
    engine = Engine(pair, vision_backend=cfg.vision_backend, n_ctx=n_ctx, threads=cfg.threads)
    try:
        images, agree, shapes = [], [], []
        if held_out is not None:
            n_prompts = 100 if cfg.prompts is None else cfg.prompts
            recs = _shapes_records(max(n_prompts, cfg.shapes), int(held_out.get("seed", 0)))
            index: dict[str, int] = {}
            for r in recs:
                if r["image"] not in index:
                    index[r["image"]] = len(images)
                    images.append(_render(r["scene"]))
            if len(images) > held_out.get("n_images", len(images)):
                log.warning("%d evaluation images, but only the first %d are held out of training",
                            len(images), held_out["n_images"])
            for i, r in enumerate(recs):
                if i < n_prompts:
                    items, target = _tokenized(engine, r["question"], r["answer"])
                    agree.append(Case(items, index[r["image"]], target, r["answer"]))
                if i < cfg.shapes:
                    shapes.append(Case(_tokenized(engine, r["question"], None)[0], index[r["image"]], [], r["answer"]))
            answers_from = "held-out shapes answers"
        else:
            n_prompts = 16 if cfg.prompts is None else cfg.prompts
            from train.shapes import eval_records
            scenes = {r["image"]: r["scene"] for r in eval_records(n_prompts, 0)}   # n_prompts distinct scenes
            images = [_render(s) for s in scenes.values()]
            for i in range(n_prompts):
                items, _ = _tokenized(engine, GENERIC_QUESTIONS[i % len(GENERIC_QUESTIONS)], None)
                agree.append(Case(items, i))
            answers_from = "greedy answers of the source LLM"
        tick("encoding images")
        embeds = engine.encode_images(images)
        if held_out is None:   # reference answers: the source LLM's own greedy answers
            for c in agree:
                prefill(engine.llm, c.items, embeds[c.image:c.image + 1])
                c.target, _ = greedy(engine.llm, cfg.answer_tokens)
                tick("reference answers")
    finally:
        engine.close()
    return _Inputs(embeds, agree, shapes, answers_from, n_ctx)


def _bits_per_weight(path: Path) -> float:
    from llava_local.formats.gguf_check import read_gguf_info
    tensors = read_gguf_info(path).tensors.values()
    n = sum(int(np.prod(t.shape)) for t in tensors)
    return 8 * sum(t.nbytes for t in tensors) / n


def _measure(path: Path, qtype: str, is_source: bool, inp: _Inputs, cfg: QuantEvalConfig,
             reference: list[np.ndarray] | None, tick: Callable[[str], None]) -> tuple[QuantRow, list[np.ndarray]]:
    load_s, llm = math.inf, None
    for _ in range(max(1, cfg.timing_runs)):
        if llm is not None:
            llm.close()
        t0 = time.perf_counter()
        llm = LlamaLLM(path, n_ctx=inp.n_ctx, n_threads=cfg.threads)
        load_s = min(load_s, time.perf_counter() - t0)
    try:
        decode_s = math.inf
        for _ in range(max(1, cfg.timing_runs)):
            prefill(llm, inp.agree[0].items, inp.embeds[inp.agree[0].image:inp.agree[0].image + 1])
            t0 = time.perf_counter()
            greedy(llm, cfg.gen_tokens, stop=False)
            decode_s = min(decode_s, time.perf_counter() - t0)
        tick(f"{qtype}: load + decode")
        top1 = []
        for c in inp.agree:
            top1.append(teacher_forced_top1(llm, c, inp.embeds))
            tick(f"{qtype}: agreement")
        ref = reference if reference is not None else top1
        n_tok = sum(len(t) for t in ref)
        agreement = sum(int((a == b).sum()) for a, b in zip(top1, ref)) / max(1, n_tok)
        accuracy = None
        if inp.shapes:
            from train.shapes import exact_match
            hits = 0
            for c in inp.shapes:
                hits += exact_match(shapes_answer(llm, c, inp.embeds), c.answer)
                tick(f"{qtype}: shapes accuracy")
            accuracy = hits / len(inp.shapes)
    finally:
        llm.close()
    row = QuantRow(qtype, is_source, path.stat().st_size, _bits_per_weight(path), load_s,
                   cfg.gen_tokens / decode_s, agreement, accuracy)
    return row, top1


def evaluate_quants(model_dir: str | os.PathLike, cfg: QuantEvalConfig = QuantEvalConfig(),
                    progress: Progress | None = None) -> QuantReport:
    """Quantize the source LLM of `model_dir` to each of `cfg.types` and measure every one."""
    types = [t.upper() for t in cfg.types]
    unknown = [t for t in types if t not in QTYPES]
    if unknown:
        raise ConversionError(f"quantization type {unknown[0]!r} unknown (choose from {', '.join(QTYPES)})")
    pair = resolve_pair(model_dir)
    src_type = source_type(pair)
    held_out = shapes_held_out(pair)
    cfg = dataclasses.replace(cfg, shapes=cfg.shapes if held_out is not None else 0)
    types = [t for t in dict.fromkeys(types) if t != src_type]   # the source is measured anyway
    n_prompts = cfg.prompts if cfg.prompts is not None else (100 if held_out is not None else 16)
    if n_prompts < 1:
        raise ConversionError("eval-quant needs at least one teacher-forced answer (--prompts >= 1)")
    total = (1 + (0 if held_out is not None else n_prompts) + len(types)
             + (len(types) + 1) * (1 + n_prompts + cfg.shapes))
    done = 0

    def tick(stage: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(stage, done, total)

    keep = cfg.work_dir is not None
    work = Path(cfg.work_dir) if keep else Path(tempfile.mkdtemp(prefix="llava-local-eval-quant-"))
    rows = []
    repack = cfg.repack
    try:
        with weight_repacking(cfg.repack):
            if repack is None:   # what LlamaLLM will do: the probe's verdict
                from llava_local.runtime.extra_bufts_probe import extra_buffer_types_allowed
                repack = extra_buffer_types_allowed()
            inp = _prepare(pair, cfg, held_out, tick)
            row, reference = _measure(pair.llm_path, f"{src_type} (source)", True, inp, cfg, None, tick)
            rows.append(row)
            for qtype in types:
                stem = pair.llm_path.stem
                path = work / (f"{stem.replace(src_type, qtype)}.gguf" if src_type in stem else f"{stem}-{qtype}.gguf")
                quantize(pair.llm_path, path, qtype, threads=cfg.threads or 0)
                tick(f"{qtype}: quantize")
                rows.append(_measure(path, qtype, False, inp, cfg, reference, tick)[0])
                if not keep:
                    path.unlink()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return QuantReport(model=str(model_dir), llm=pair.llm_path.name, mmproj=pair.mmproj_path.name,
                       source_type=src_type, vision_backend=cfg.vision_backend, n_answers=len(inp.agree),
                       n_tokens=sum(len(c.target) for c in inp.agree), answers_from=inp.answers_from,
                       n_shapes=cfg.shapes, gen_tokens=cfg.gen_tokens, timing_runs=max(1, cfg.timing_runs),
                       threads=cfg.threads or os.cpu_count() or 1, repack=repack, rows=rows)


# --- output ---

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
