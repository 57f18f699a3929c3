"""GPT-assisted visual instruction data (the paper's section 3), with a local GGUF teacher.

    llava-local datagen --annotations coco.json --images DIR --teacher teacher.gguf \\
        --kinds conversation,detail,reasoning -o llava_instruct.json
    # the shapes world, end to end: python -m train.shapes_coco --out /tmp/sc --n 20

The teacher never sees the image. As in the paper it reads a *symbolic representation*: the
image's captions, then one line per object box (coco_annotations.py reads COCO-style files). A
system prompt and hand-written few-shot seeds per kind steer it to write one of the three kinds,
conversation, detail and reasoning (datagen_prompts.py).

Output: LLaVA JSON (train/data.py reads it): [{"id": "<image id>-<kind>", "image": file_name,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]}].
Records come kind by kind (all conversations, then details, then reasoning: consecutive prompts share
the kind's system prompt and seeds, whose KV cache the teacher keeps). Every record is validated
and deduplicated (same image and same normalised text; datagen_records.py). Output cut off by
max_tokens is trimmed to its last whole pair / sentence. Work is journaled to
`<out>.progress.jsonl` (one line per finished task, written or rejected with its reason), so an
interrupted run resumes where it stopped; the final JSON is written atomically at the end.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llava_local.errors import ContextOverflowError
from llava_local.fileio import atomic_write
from llava_local.prompts.templates import IMAGE_MARKER
from llava_local.runtime.sampling import SamplingParams

from .coco_annotations import ImageContext, load_annotations, symbolic
from .datagen_prompts import KINDS, teacher_messages
from .datagen_records import ParseError, build_record, dedup_key, parse_teacher_output, trim_truncated, validate_record
from .errors import TrainConfigError

log = logging.getLogger(__name__)

Task = tuple[str, ImageContext, str]           # (task id = the output record's id, image, kind)


@dataclass
class DatagenConfig:
    kinds: tuple[str, ...] = KINDS
    per_image: str = "all"          # "all": every kind for every image; "cycle": image i gets kinds[i % k]
    n_seeds: int = 2                # few-shot seed examples per prompt (the paper uses a few per kind)
    max_tokens: dict = field(default_factory=lambda: {"conversation": 160, "detail": 120, "reasoning": 120})
    temperature: float = 0.6        # some variety between images, still mostly on-format for a small teacher
    repeat_penalty: float = 1.1     # small teachers loop ("Question: ... Question: ...") without it
    seed: int = 0                   # per task: seed + crc32(task), so a resumed run makes the same text


@dataclass
class DatagenResult:
    out_path: Path
    written: dict[str, int]                    # kind -> records in the output
    rejected: dict[str, int]                   # kind -> tasks rejected (parse / validation / duplicate)
    reasons: dict[str, int]                    # reason -> count
    resumed: int                               # tasks taken from the journal, not generated again
    generated: int                             # tasks generated in this run
    complete: bool                             # every task done (False: stopped by `limit`)
    seconds: float


def tasks_for(images: list[ImageContext], cfg: DatagenConfig) -> list[Task]:
    """(task id, image, kind) in a fixed order; the task id is the output record's id."""
    out = []
    for i, ctx in enumerate(images):
        kinds = cfg.kinds if cfg.per_image == "all" else (cfg.kinds[i % len(cfg.kinds)],)
        out += [(f"{ctx.image_id}-{k}", ctx, k) for k in kinds]
    # kind-major order: consecutive prompts share the kind's system prompt and seeds (KV prefix reuse)
    return sorted(out, key=lambda t: cfg.kinds.index(t[2]))


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.jsonl")


def read_journal(path: Path) -> list[dict]:
    """Finished tasks; a torn last line (the process was killed mid-write) is ignored."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            log.warning("%s: ignoring a torn line (interrupted write)", path)
            continue
        if isinstance(e, dict) and isinstance(e.get("task"), str):
            entries.append(e)
    return entries


def _check_config(cfg: DatagenConfig) -> None:
    for k in cfg.kinds:
        if k not in KINDS:
            raise TrainConfigError(f"unknown kind {k!r} (expected {', '.join(KINDS)})")
    if cfg.per_image not in ("all", "cycle"):
        raise TrainConfigError(f"per_image must be 'all' or 'cycle', got {cfg.per_image!r}")


def _resume(jpath: Path) -> tuple[dict[str, dict], set[str]]:
    """(task id -> journal entry, dedup keys of the records written) of an earlier run."""
    done = {e["task"]: e for e in read_journal(jpath)}
    for task, e in done.items():   # journaled records meet today's validator too (rules may have tightened)
        problems = validate_record(e["record"]) if "record" in e else []
        if problems:
            done[task] = {k: v for k, v in e.items() if k != "record"} | {"rejected": "invalid: " + "; ".join(problems)}
    return done, {dedup_key(e["record"]) for e in done.values() if "record" in e}


def generate_dataset(annotations, images_dir: str | os.PathLike, teacher, out: str | os.PathLike, *,
                     cfg: DatagenConfig = DatagenConfig(), limit: int | None = None,
                     progress: bool = True, on_task: Callable[[dict], None] | None = None) -> DatagenResult:
    """Write LLaVA JSON to `out` from COCO-style `annotations` with `teacher` (a
    llava_local.runtime.text_generation.TextGenerator, or anything with `generate(messages, max_tokens=,
    sampling=)`). `limit` stops after that many newly generated tasks (resume later by calling again)."""
    _check_config(cfg)
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tasks = tasks_for(load_annotations(annotations), cfg)
    jpath = journal_path(out)
    done, seen = _resume(jpath)
    todo = [t for t in tasks if t[0] not in done]
    generated = _generate(todo, len(tasks), Path(images_dir), teacher, cfg, done, seen, jpath, limit=limit,
                          progress=progress, on_task=on_task)
    records = [done[t]["record"] for t, _, _ in tasks if t in done and "record" in done[t]]
    atomic_write(out, json.dumps(records, indent=1, ensure_ascii=False).encode("utf-8"))
    written, rejected, reasons = _tally(tasks, done, cfg.kinds)
    return DatagenResult(out, written, rejected, reasons, len(tasks) - len(todo), generated,
                         all(t in done for t, _, _ in tasks), time.perf_counter() - t0)


def _generate(todo: list[Task], n_tasks: int, images_dir: Path, teacher, cfg: DatagenConfig, done: dict[str, dict],
              seen: set[str], jpath: Path, *, limit: int | None, progress: bool,
              on_task: Callable[[dict], None] | None) -> int:
    """Run the tasks to do (up to `limit`), journaling each as it finishes; returns how many ran."""
    from tqdm import tqdm

    generated = 0
    with open(jpath, "a", encoding="utf-8") as journal, \
            tqdm(total=n_tasks, initial=n_tasks - len(todo), desc="datagen", unit="item",
                 file=sys.stderr, disable=not progress) as bar:
        for task, ctx, kind in todo:
            if limit is not None and generated >= limit:
                break
            entry = _run_task(task, ctx, kind, images_dir, teacher, cfg, seen)
            journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            done[task] = entry
            generated += 1
            bar.update(1)
            if on_task:
                on_task(entry)
    return generated


def _tally(tasks: list[Task], done: dict[str, dict], kinds: tuple[str, ...]):
    """(records written per kind, tasks rejected per kind, rejections per reason)."""
    written = {k: 0 for k in kinds}
    rejected = {k: 0 for k in kinds}
    reasons: dict[str, int] = {}
    for t, _, kind in tasks:
        e = done.get(t)
        if e is None:
            continue
        if "record" in e:
            written[kind] += 1
        else:
            rejected[kind] += 1
            reason = e["rejected"].split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return written, rejected, reasons


def _run_task(task: str, ctx: ImageContext, kind: str, images_dir: Path, teacher, cfg: DatagenConfig,
              seen: set[str]) -> dict:
    entry = {"task": task, "kind": kind, "image": ctx.file_name}
    if not (images_dir / ctx.file_name).is_file():
        return entry | {"rejected": f"image missing: {images_dir / ctx.file_name}"}
    if not ctx.captions and not ctx.objects:
        return entry | {"rejected": "no captions or boxes"}
    task_seed = (cfg.seed + zlib.crc32(task.encode())) % 2**31
    sampling = SamplingParams(temperature=cfg.temperature, repeat_penalty=cfg.repeat_penalty, seed=task_seed)
    try:
        text = teacher.generate(teacher_messages(kind, ctx, cfg.n_seeds), max_tokens=cfg.max_tokens[kind],
                                sampling=sampling)
    except ContextOverflowError as exc:      # an image with very many boxes: skip it, keep going
        return entry | {"rejected": f"too long: {exc}"}
    entry["teacher"] = text
    try:
        turns = parse_teacher_output(kind, text, random.Random(task_seed))
        if getattr(teacher, "last_finish", "stop") == "length":
            turns = trim_truncated(kind, turns)
    except ParseError as exc:
        return entry | {"rejected": f"parse: {exc}"}
    rec = build_record(task, ctx.file_name, turns)
    problems = validate_record(rec)
    if problems:
        return entry | {"rejected": "invalid: " + "; ".join(problems)}
    key = dedup_key(rec)
    if key in seen:
        return entry | {"rejected": "duplicate: same text for this image"}
    seen.add(key)
    return entry | {"record": rec}


def write_bench_questions(records: list[dict], annotations, path: str | os.PathLike) -> int:
    """LLaVA-Bench-style questions for `llava-local eval --judge`: the first turn of each record as
    {"id", "image", "question", "answer" (the teacher's, the reference), "category", "context"},
    one JSON object per line; returns the count. The context is the symbolic representation the
    teacher saw, so the judge reads the image as the paper's judge does."""
    contexts = {ctx.file_name: symbolic(ctx) for ctx in load_annotations(annotations)}
    lines = []
    for rec in records:
        conv = rec["conversations"]
        kind = rec["id"].rsplit("-", 1)[-1]
        lines.append(json.dumps({"id": rec["id"], "image": rec["image"],
                                 "question": conv[0]["value"].replace(IMAGE_MARKER, "").strip(),
                                 "answer": conv[1]["value"], "category": kind if kind in KINDS else "",
                                 "context": contexts.get(rec["image"], "")}, ensure_ascii=False))
    atomic_write(path, "".join(line + "\n" for line in lines).encode("utf-8"))
    return len(lines)
