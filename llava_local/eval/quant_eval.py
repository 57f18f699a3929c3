"""What each llama.cpp quantization of the LLM costs: file size, load time, decode speed, top-1
agreement with the unquantized (source) LLM over teacher-forced answers, and, for the shapes demo
model, exact-match accuracy on its held-out questions.

    from convert.quantize import QTYPES, quantize
    from train.shapes import shapes_data
    report = evaluate_quants("out/", QuantEvalConfig(types=("Q4_K_M", "Q8_0")),
                             quantizer=Quantizer(tuple(QTYPES), quantize), shapes=shapes_data())
    print(markdown_table(report)); plot_report(report, "quant.png")      # eval/quant_report.py

CLI: `llava-local eval-quant out/ --report quant.md --plot quant.png` (cli/quantize.py hands in the
quantizer and the shapes data: this package never imports convert/ or train/).

Method. MODEL_DIR holds an F32/F16/BF16 LLM + mmproj (+ manifest), e.g. a `convert` output. For the
agreement, every image is encoded once, by the source mmproj (default vision backend `torch`, the
exact one), and the same embeddings feed every LLM: only the LLM's quantization varies. The source
LLM is measured first and is the reference: at each teacher-forced answer position, a quantized LLM
"agrees" when its arg-max token equals the source's. Answers are the shapes held-out answers for the
demo model (train/shapes.py), otherwise the source LLM's own greedy answers to fixed questions about
rendered shapes scenes. Prompts are the engine's (prompts/turns.py); the targets are the answer and
the end-of-turn token as the template renders them after the prompt. The shapes accuracy is
eval/shapes.py's evaluation, run on an engine with each LLM.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import gguf
import numpy as np

from llava_local.errors import ConversionError, LlavaLocalError, ModelFilesError
from llava_local.eval.quant_report import QuantReport, QuantRow
from llava_local.eval.shapes import ANSWER_TOKENS, GREEDY, ShapesData, ShapesSet, ShapesSplit, evaluate_shapes
from llava_local.prompts.templates import Message
from llava_local.prompts.turns import user_content
from llava_local.runtime.engine import Engine
from llava_local.runtime.generate import Decode
from llava_local.runtime.llm import LlamaLLM
from llava_local.runtime.model_pair import ModelPair, resolve_pair
from llava_local.runtime.sampling import Sampler

log = logging.getLogger(__name__)

FT = gguf.LlamaFileType
SOURCE_FTYPES = {FT.ALL_F32: "F32", FT.MOSTLY_F16: "F16", FT.MOSTLY_BF16: "BF16"}   # unquantized general.file_type
# Questions for models other than the shapes demo; the images are rendered shapes scenes (nothing downloaded)
GENERIC_QUESTIONS = ("Describe the image.", "What colours do you see?", "How many objects are there?",
                     "What is in the top left corner?")

Progress = Callable[[str, int, int], None]  # (stage, units done, units in all)


@dataclass(frozen=True)
class Quantizer:
    """convert/quantize.py, handed in by the caller (cli/quantize.py)."""
    types: tuple[str, ...]                  # the LLM types it writes (QTYPES)
    quantize: Callable[..., Path]           # quantize(src, dst, qtype, threads=N) -> dst


@dataclass
class QuantEvalConfig:
    types: tuple[str, ...] | None = None   # None: every type the quantizer writes
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
    items: list                    # prompt: token-id lists and image slots (-1 - index), as Engine.prompt_items makes
    image: int                     # row of the embeddings table
    target: list[int] = field(default_factory=list)   # teacher-forced answer tokens (answer + end of turn)
    answer: str = ""               # expected answer text


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


def _question(question: str) -> list[Message]:
    return [Message("user", user_content(question, n_images=1))]


def teacher_forced_case(engine: Engine, question: str, answer: str, image: int) -> Case:
    """One image + question turn, and as targets the ids the template renders after its prompt when
    `answer` is the reply: the answer and the end-of-turn token (what follows that is not scored)."""
    msgs = _question(question)
    prompt = engine.prompt.render(msgs)
    closed = engine.prompt.render(msgs + [Message("assistant", answer)], add_generation_prompt=False)
    if not closed.startswith(prompt):
        raise LlavaLocalError(f"template {engine.prompt.name}: the answered turn does not extend the prompt")
    target = engine.prompt.tokenize(closed[len(prompt):], at_start=False)
    end = next((i for i, t in enumerate(target) if engine.llm.is_eog(t)), len(target) - 1)
    return Case(engine.prompt_items(msgs), image, target[:end + 1], answer)


def _prefill(engine: Engine, case: Case, embeds: Sequence[np.ndarray]) -> None:
    """The case's prompt on a fresh cache."""
    engine.llm.reset()
    engine.prefill(case.items, embeds[case.image:case.image + 1])


def teacher_forced_top1(engine: Engine, case: Case, embeds: Sequence[np.ndarray]) -> np.ndarray:
    """Arg-max token at each answer position, with the true answer fed in (teacher forcing)."""
    llm = engine.llm
    _prefill(engine, case, embeds)
    first = int(np.argmax(llm.last_logits()))
    if len(case.target) == 1:
        return np.array([first])
    llm.all_logits = True         # keep logits of the answer positions only, not of the image
    try:
        llm.eval_tokens(case.target[:-1])
        rest = llm.all_position_logits().argmax(-1)   # since the prefill's reset: the answer positions only
    finally:
        llm.all_logits = False
    return np.concatenate([[first], rest])


def greedy_answer(engine: Engine, case: Case, embeds: Sequence[np.ndarray], max_tokens: int) -> list[int]:
    """The LLM's own greedy answer, with the end-of-turn token it chose when it stopped."""
    _prefill(engine, case, embeds)
    dec = Decode(engine.llm, Sampler(GREEDY), max_tokens)
    tokens = dec.run()
    if dec.finish_reason == "stop":   # the loop stops before evaluating it: it is the arg-max of the last logits
        tokens.append(int(np.argmax(engine.llm.last_logits())))
    return tokens


# --- the evaluation ---

@dataclass
class _Inputs:
    embeds: list[np.ndarray]       # (n_tokens_i, n_embd) per image, from the source mmproj
    agree: list[Case]
    shapes: ShapesSet | None       # held-out questions for the accuracy column
    answers_from: str
    n_ctx: int


def _engine(pair: ModelPair, cfg: QuantEvalConfig, n_ctx: int, **fields) -> Engine:
    return Engine(pair, vision_backend=cfg.vision_backend, n_ctx=n_ctx, threads=cfg.threads,
                  extra_bufts=cfg.repack, **fields)


def _prepare(pair: ModelPair, cfg: QuantEvalConfig, shapes: ShapesData, split: ShapesSplit, image_dir: Path,
             tick: Callable[[str], None]) -> tuple[_Inputs, bool]:
    """Cases, image embeddings and reference answers, on the source LLM; also whether llama.cpp
    repacked its weights."""
    gen_room = max(cfg.gen_tokens, cfg.answer_tokens, ANSWER_TOKENS)
    n_ctx = min(pair.n_ctx_train or 4096, pair.max_image_tokens() + 256 + gen_room)
    engine = _engine(pair, cfg, n_ctx)
    try:
        held_out = None
        if split.from_model:
            n_prompts = 100 if cfg.prompts is None else cfg.prompts
            questions = shapes.scored(max(n_prompts, cfg.shapes), split.seed, image_dir)
            index = {path: i for i, path in enumerate(dict.fromkeys(q.image for q in questions.questions))}
            images = list(index)
            if split.warning(len(images)):
                log.warning("%d evaluation images, but only the first %d are held out of training",
                            len(images), split.held_out)
            agree = [teacher_forced_case(engine, q.question, q.answer, index[q.image])
                     for q in questions.questions[:n_prompts]]
            if cfg.shapes:
                held_out = dataclasses.replace(questions, questions=questions.questions[:cfg.shapes])
            answers_from = "held-out shapes answers"
        else:
            n_prompts = 16 if cfg.prompts is None else cfg.prompts
            images = shapes.scenes(n_prompts, 0, image_dir)
            agree = [Case(engine.prompt_items(_question(GENERIC_QUESTIONS[i % len(GENERIC_QUESTIONS)])), i)
                     for i in range(n_prompts)]
            answers_from = "greedy answers of the source LLM"
        tick("encoding images")
        embeds = engine.encode_images([im.image for im in engine.load_images(images)])
        if not split.from_model:   # reference answers: the source LLM's own greedy answers
            for c in agree:
                c.target = greedy_answer(engine, c, embeds, cfg.answer_tokens)
                tick("reference answers")
        repacked = engine.llm.extra_bufts
    finally:
        engine.close()
    return _Inputs(embeds, agree, held_out, answers_from, n_ctx), repacked


def _bits_per_weight(path: Path) -> float:
    from llava_local.formats.gguf_check import read_gguf_info
    tensors = read_gguf_info(path).tensors.values()
    n = sum(int(np.prod(t.shape)) for t in tensors)
    return 8 * sum(t.nbytes for t in tensors) / n


def _load_seconds(path: Path, inp: _Inputs, cfg: QuantEvalConfig) -> float:
    """The LLM's load (model + context), best of the timing runs; loaded as the engine loads it."""
    best = math.inf
    for _ in range(max(1, cfg.timing_runs)):
        t0 = time.perf_counter()
        llm = LlamaLLM(path, n_ctx=inp.n_ctx, n_threads=cfg.threads, extra_bufts=cfg.repack)
        best = min(best, time.perf_counter() - t0)
        llm.close()
    return best


def _measure(pair: ModelPair, qtype: str, is_source: bool, inp: _Inputs, cfg: QuantEvalConfig,
             reference: list[np.ndarray] | None, tick: Callable[[str], None]) -> tuple[QuantRow, list[np.ndarray]]:
    load_s = _load_seconds(pair.llm_path, inp, cfg)
    engine = _engine(pair, cfg, inp.n_ctx, gpu_layers=0)     # the CPU's figures: as the table says
    try:
        decode_s = math.inf
        for _ in range(max(1, cfg.timing_runs)):
            _prefill(engine, inp.agree[0], inp.embeds)
            dec = Decode(engine.llm, Sampler(GREEDY), cfg.gen_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            dec.run()
            decode_s = min(decode_s, time.perf_counter() - t0)
        tick(f"{qtype}: load + decode")
        top1 = []
        for c in inp.agree:
            top1.append(teacher_forced_top1(engine, c, inp.embeds))
            tick(f"{qtype}: agreement")
        ref = reference if reference is not None else top1
        n_tok = sum(len(t) for t in ref)
        agreement = sum(int((a == b).sum()) for a, b in zip(top1, ref)) / max(1, n_tok)
        accuracy = None
        if inp.shapes is not None:
            res = evaluate_shapes(engine, inp.shapes, on_item=lambda _it: tick(f"{qtype}: shapes accuracy"))
            accuracy = res.accuracy()
    finally:
        engine.close()
    row = QuantRow(qtype, is_source, pair.llm_path.stat().st_size, _bits_per_weight(pair.llm_path), load_s,
                   cfg.gen_tokens / decode_s, agreement, accuracy)
    return row, top1


def _check_types(types: Sequence[str], quantizer: Quantizer) -> list[str]:
    types = [t.upper() for t in types]
    unknown = [t for t in types if t not in quantizer.types]
    if unknown:
        raise ConversionError(f"quantization type {unknown[0]!r} unknown (choose from {', '.join(quantizer.types)})")
    return types


def evaluate_quants(model_dir: str | os.PathLike, cfg: QuantEvalConfig = QuantEvalConfig(), *,
                    quantizer: Quantizer, shapes: ShapesData, progress: Progress | None = None) -> QuantReport:
    """Quantize the source LLM of `model_dir` to each of `cfg.types` and measure every one."""
    types = _check_types(quantizer.types if cfg.types is None else cfg.types, quantizer)
    pair = resolve_pair(model_dir)
    src_type = source_type(pair)
    split = shapes.split(pair.manifest)
    is_shapes = split.from_model
    cfg = dataclasses.replace(cfg, shapes=cfg.shapes if is_shapes else 0)
    types = [t for t in dict.fromkeys(types) if t != src_type]   # the source is measured anyway
    n_prompts = cfg.prompts if cfg.prompts is not None else (100 if is_shapes else 16)
    if n_prompts < 1:
        raise ConversionError("eval-quant needs at least one teacher-forced answer (--prompts >= 1)")
    total = (1 + (0 if is_shapes else n_prompts) + len(types)
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
    try:
        with tempfile.TemporaryDirectory(prefix="llava-local-eval-quant-images-") as image_dir:
            inp, repacked = _prepare(pair, cfg, shapes, split, Path(image_dir), tick)
            row, reference = _measure(pair, f"{src_type} (source)", True, inp, cfg, None, tick)
            rows.append(row)
            for qtype in types:
                stem = pair.llm_path.stem
                path = work / (f"{stem.replace(src_type, qtype)}.gguf" if src_type in stem else f"{stem}-{qtype}.gguf")
                quantizer.quantize(pair.llm_path, path, qtype, threads=cfg.threads or 0)
                tick(f"{qtype}: quantize")
                rows.append(_measure(resolve_pair(path, pair.mmproj_path), qtype, False, inp, cfg, reference,
                                     tick)[0])
                if not keep:
                    path.unlink()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return QuantReport(model=str(model_dir), llm=pair.llm_path.name, mmproj=pair.mmproj_path.name,
                       source_type=src_type, vision_backend=cfg.vision_backend, n_answers=len(inp.agree),
                       n_tokens=sum(len(c.target) for c in inp.agree), answers_from=inp.answers_from,
                       n_shapes=cfg.shapes, gen_tokens=cfg.gen_tokens, timing_runs=max(1, cfg.timing_runs),
                       threads=cfg.threads or os.cpu_count() or 1, repack=repacked, rows=rows)
