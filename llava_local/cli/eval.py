"""`llava-local eval` (score a model) and `llava-local datagen` (instruction data from a local
teacher): thin commands over llava_local/eval/ and train/datagen.py. They build what eval/ must
not import itself: the shapes held-out data (train/shapes.py `shapes_data`)."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from llava_local.cli.errors import domain_errors
from llava_local.cli.options import engine_from, model_options, pair_from, status
from llava_local.logs import setup_logging
from llava_local.runtime.sampling import SamplingParams


@click.command("eval")
@click.option("-q", "--questions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL of {image, question, answer[, choices][, context, category]}.")
@click.option("--images", "image_root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder the question images are relative to (default: the JSONL's folder).")
@click.option("--shapes", "n_shapes", type=click.IntRange(1), default=None,
              help="Evaluate on N held-out shapes images (bench/eval_shapes.py's set).")
@click.option("--shapes-seed", type=int, default=None, help="Seed of the shapes set (default: the manifest's, else 0).")
@click.option("--judge", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Judge LLM .gguf for LLaVA-Bench-style scoring (questions need a 'context').")
@click.option("--judge-threads", type=click.IntRange(1), default=None, help="CPU threads of the judge.")
@click.option("--judge-max-tokens", type=click.IntRange(4), default=48, show_default=True,
              help="Tokens the judge may write (its scores come first).")
@click.option("--temp", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--max-tokens", type=click.IntRange(1), default=None,
              help="Answer length (default: 16 for --shapes as bench/eval_shapes.py, 64, 256 with --judge).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N questions.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write a Markdown report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (every item) as JSON.")
@model_options
def eval_cmd(questions, image_root, n_shapes, shapes_seed, judge, judge_threads, judge_max_tokens, temp, seed,
             max_tokens, limit, report, as_json, **kw):
    """Score a model: exact match, multiple choice, or judged (LLaVA-Bench style).

    \b
    Examples:
      llava-local eval --shapes 100                                   # the demo model, held-out shapes
      llava-local eval --model out/ -q scienceqa.jsonl --report sqa.md
      llava-local eval --model out/ -q bench.jsonl --judge judge.gguf --judge-threads 4
    """
    domain_errors(_eval)(questions, image_root, n_shapes, shapes_seed, judge, judge_threads, judge_max_tokens,
                          temp, seed, max_tokens, limit, report, as_json, kw)


def _eval(questions, image_root, n_shapes, shapes_seed, judge, judge_threads, judge_max_tokens, temp, seed,
          max_tokens, limit, report, as_json, kw):
    from tqdm import tqdm

    from llava_local.errors import LlavaLocalError
    from llava_local.eval.evaluate import evaluate
    from llava_local.eval.judge import Judge
    from llava_local.eval.questions import check_questions, load_questions
    from llava_local.eval.report import markdown_report
    from llava_local.eval.shapes import ANSWER_TOKENS, evaluate_shapes

    setup_logging(kw["verbose"])
    if (questions is None) == (n_shapes is None):
        raise click.UsageError("give either --questions FILE or --shapes N")
    if n_shapes is not None and judge:
        raise click.UsageError("--judge needs --questions with a context per item")
    if questions is not None:      # the questions file is checked before any model loads
        qs = load_questions(questions)[:limit]
        root = Path(image_root) if image_root else Path(questions).resolve().parent
        check_questions(qs, root, judged=bool(judge))
    pair = pair_from(kw)
    meta = {"model": pair.llm_path.name, "mmproj": pair.mmproj_path.name}
    sampling = SamplingParams(temperature=temp, seed=seed).validate()
    with tempfile.TemporaryDirectory() as tmp:
        if n_shapes is not None:
            from train.shapes import shapes_data
            data = shapes_data()
            split = data.split(pair.manifest, n_images=n_shapes, seed=shapes_seed)
            if split.warning():
                status(f"warning: {split.warning()}")
            shapes = data.held_out(split, Path(tmp), limit=limit)
            meta |= {"set": f"shapes held-out, {n_shapes} images, seed {split.seed}"}
            max_tokens = max_tokens or ANSWER_TOKENS
        else:
            meta |= {"set": str(questions)}
            max_tokens = max_tokens or (256 if judge else 64)
        judge_gen = None
        if judge:
            judge_gen = Judge.load(judge, threads=judge_threads or kw["threads"], verbose=kw["verbose"],
                                   max_tokens=judge_max_tokens)
            meta |= {"judge": Path(judge).name}
        engine = engine_from(kw, pair, workload="batch")
        meta |= {"vision_backend": engine.vision.name}
        bar = tqdm(total=len(shapes.questions if n_shapes is not None else qs), desc="eval", unit="q",
                   file=sys.stderr, disable=None)
        try:
            if n_shapes is not None:      # bench/eval_shapes.py's figure: "reasoning" is reported apart
                res = evaluate_shapes(engine, shapes, max_tokens=max_tokens, sampling=sampling,
                                      on_item=lambda _it: bar.update(1))
            else:
                res = evaluate(engine, qs, image_root=root, max_tokens=max_tokens, sampling=sampling,
                               judge=judge_gen, on_item=lambda _it: bar.update(1))
        finally:
            bar.close()
            engine.close()
            if judge_gen:
                judge_gen.close()
    res.meta = meta
    if report:
        try:
            Path(report).write_text(markdown_report(res), encoding="utf-8")
        except OSError as exc:
            raise LlavaLocalError(f"{report}: cannot write the report ({exc})") from None
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=1, ensure_ascii=False))
        return
    _print_summary(res, meta, judged=bool(judge))


def _print_summary(res, meta: dict, *, judged: bool) -> None:
    click.echo(f"model {meta['model']} + {meta['mmproj']} on {meta['set']}")
    acc = res.accuracy()
    if acc is not None:
        if res.headline_kinds:
            scored = sum(it.question.category in res.headline_kinds for it in res.items)
            click.echo(f"exact match: {acc:.1%} on {scored} questions ({', '.join(res.headline_kinds)}; "
                       "reasoning not in the figure, as in bench/eval_shapes.py)")
        else:
            click.echo(f"accuracy: {acc:.1%} on {sum(it.correct is not None for it in res.items)} questions")
    rel = res.relative_score()
    if judged:
        click.echo(f"relative score: {'n/a' if rel is None else format(rel, '.1f')} "
                   f"({len(res.items) - len(res.unscored())} scored, {len(res.unscored())} unscored)")
    for cat, d in res.per_category().items():
        parts = [f"n={d['n']}"]
        if "accuracy" in d:
            parts.append(f"accuracy {d['accuracy']:.1%}")
        if "relative_score" in d:
            parts.append(f"relative {d['relative_score']:.1f} (model {d['model_mean']:.2f} / "
                         f"reference {d['reference_mean']:.2f})")
        if d.get("unscored"):
            parts.append(f"unscored {d['unscored']}")
        click.echo(f"  {cat:<12} " + ", ".join(parts))
    for it in res.unscored():
        click.echo(f"  unscored {it.question.id}: {it.unscored}")
    click.echo(f"{res.seconds:.1f}s")


@click.command("datagen")
@click.option("--annotations", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="COCO-style JSON (images, boxes, categories, captions); repeat to merge files.")
@click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder the annotations' file_name values are relative to.")
@click.option("--teacher", required=True, type=click.Path(exists=True, dir_okay=False), envvar="LLAVA_LOCAL_TEACHER",
              help="Teacher LLM .gguf (an instruct model with a chat template).  [env: LLAVA_LOCAL_TEACHER]")
@click.option("--kinds", default="conversation,detail,reasoning", show_default=True,
              help="Comma-separated kinds to write.")
@click.option("--per-image", type=click.Choice(["all", "cycle"]), default="all", show_default=True,
              help="all: every kind for each image; cycle: one kind per image, in turn.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="LLaVA JSON to write.")
@click.option("--max-tokens", type=click.IntRange(8), default=None, help="Teacher tokens per item (default per kind).")
@click.option("--temp", type=click.FloatRange(0), default=0.6, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", "n_seeds", type=click.IntRange(0, 2), default=2, show_default=True,
              help="Few-shot seed examples per prompt.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Stop after N new items (run again to resume).")
@click.option("--bench", "bench_path", type=click.Path(dir_okay=False), default=None,
              help="Also write LLaVA-Bench-style questions (first turns + context) for `eval --judge`.")
@click.option("--threads", type=click.IntRange(1), default=None, envvar="LLAVA_LOCAL_THREADS")
@click.option("--ctx", type=click.IntRange(256), default=2048, show_default=True)
@click.option("-v", "--verbose", is_flag=True)
def datagen(annotations, images_dir, teacher, kinds, per_image, out, max_tokens, temp, seed, n_seeds, limit,
            bench_path, threads, ctx, verbose):
    """Write LLaVA instruction data (conversation, detail, reasoning) with a local teacher LLM.

    The teacher reads each image as text (captions + boxes in [0, 1]); its output is parsed,
    validated and deduplicated. Interrupted runs resume from OUT.progress.jsonl.

    \b
    Examples:
      python -m train.shapes_coco --out /tmp/sc --n 20
      llava-local datagen --annotations /tmp/sc/annotations.json --images /tmp/sc \\
          --teacher SmolLM2-135M-Instruct.Q4_1.gguf -o /tmp/sc/instruct.json --bench /tmp/sc/bench.jsonl
      llava-local eval --model out/ -q /tmp/sc/bench.jsonl --images /tmp/sc --judge judge.gguf  # with --bench
      llava-local datagen --annotations instances_val2017.json --annotations captions_val2017.json \\
          --images val2017/ --teacher teacher.gguf --kinds detail -o detail.json
    """
    domain_errors(_datagen)(annotations, images_dir, teacher, kinds, per_image, out, max_tokens, temp, seed,
                             n_seeds, limit, bench_path, threads, ctx, verbose)


def _datagen(annotations, images_dir, teacher, kinds, per_image, out, max_tokens, temp, seed, n_seeds, limit,
             bench_path, threads, ctx, verbose):
    from llava_local.runtime.text_generation import TextGenerator
    from train.datagen import KINDS, DatagenConfig, generate_dataset, load_annotations, write_bench_questions

    setup_logging(verbose)
    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    bad = [k for k in kind_list if k not in KINDS]
    if bad or not kind_list:
        raise click.BadParameter(f"{', '.join(bad) or 'none'} (expected some of {', '.join(KINDS)})",
                                 param_hint="--kinds")
    load_annotations(list(annotations))      # a malformed file fails before the teacher loads
    cfg = DatagenConfig(kinds=kind_list, per_image=per_image, n_seeds=n_seeds, temperature=temp, seed=seed)
    if max_tokens:
        cfg.max_tokens = {k: max_tokens for k in cfg.max_tokens}
    gen = TextGenerator(teacher, n_ctx=ctx, threads=threads, verbose=verbose)
    try:
        res = generate_dataset(list(annotations), images_dir, gen, out, cfg=cfg, limit=limit)
    finally:
        gen.close()
    click.echo(str(res.out_path))
    if bench_path:
        n = write_bench_questions(json.loads(res.out_path.read_text(encoding="utf-8")), list(annotations), bench_path)
        click.echo(str(bench_path))
        status(f"{n} judged-evaluation questions in {bench_path}")
    reasons = ", ".join(f"{k} {v}" for k, v in res.reasons.items())
    status(f"written {sum(res.written.values())} ({', '.join(f'{k} {v}' for k, v in res.written.items())}); "
           f"rejected {sum(res.rejected.values())}{f' ({reasons})' if reasons else ''}; "
           f"{res.generated} generated now, {res.resumed} from the journal; {res.seconds:.1f}s"
           + ("" if res.complete else "; stopped early (run again to resume)"))
