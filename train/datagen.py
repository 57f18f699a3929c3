"""GPT-assisted visual instruction data (the paper's section 3), with a local GGUF teacher.

    llava-local datagen --annotations coco.json --images DIR --teacher teacher.gguf \\
        --kinds conversation,detail,reasoning -o llava_instruct.json
    # the shapes world, end to end: python -m train.shapes_coco --out /tmp/sc --n 20

The teacher never sees the image. As in the paper it reads a *symbolic representation*: the
image's captions, then one line per object box, `name: [x0, y0, x1, y1]` normalised to [0, 1]
with 3 decimals. A system prompt and hand-written few-shot seeds (user: context, assistant:
response) per kind steer it to write one of the three kinds:
- conversation: several "Question: / Answer:" pairs, answered as if seeing the image;
- detail: a detailed description; the human turn is one of DETAIL_INSTRUCTIONS (paper, table 9);
- reasoning: one question that needs step-by-step reasoning, and its answer.

Input (one or more COCO-style JSON files, merged by image id):
    {"images": [{"id", "file_name", "width", "height"}],
     "annotations": [{"image_id", "bbox": [x, y, w, h], "category_id"}     # instances (pixels)
                     | {"image_id", "caption"}],                           # COCO-captions style
     "categories": [{"id", "name"}],
     "captions": [{"image_id", "caption"}]}                                # optional, same as above
so COCO's instances_*.json and captions_*.json can be passed together.

Output: LLaVA JSON (train/data.py reads it): [{"id": "<image id>-<kind>", "image": file_name,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]}].
Records come kind by kind (all conversations, then details, then reasoning: consecutive prompts share
the kind's system prompt and seeds, whose KV cache the teacher keeps). Every record is validated
(`validate_record`: alternating non-empty turns, `<image>` once, in the first human turn, no
template control text, no leaked coordinates or "caption" talk) and deduplicated (same image and
same normalised text). Output cut off by max_tokens is trimmed to its last whole pair / sentence. Work is journaled to
`<out>.progress.jsonl` (one line per finished task, written or rejected with its reason), so an
interrupted run resumes where it stopped; the final JSON is written atomically at the end.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from llava_local.errors import ContextOverflowError, LlavaLocalError
from llava_local.runtime.sampling import SamplingParams
from llava_local.prompts.templates import IMAGE_MARKER, Message

log = logging.getLogger(__name__)

KINDS = ("conversation", "detail", "reasoning")
MAX_TURN_CHARS = 2000          # a turn longer than this is a runaway generation, not data
MIN_ANSWER_WORDS = 2
# Chat-template control text a small teacher may echo: never training data.
FORBIDDEN = ("<|im_start|>", "<|im_end|>", "</s>", "<s>", "<|endoftext|>", "[INST]", "USER:", "ASSISTANT:")

# Paper, table 9 (the instructions of the detailed-description kind).
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)


# --- the image as text ---

@dataclass
class ImageContext:
    image_id: str
    file_name: str
    width: float
    height: float
    captions: list[str] = field(default_factory=list)
    objects: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)  # name, x0 y0 x1 y1 in [0,1]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LlavaLocalError(f"{path}: cannot read annotations ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images", []), list):
        raise LlavaLocalError(f"{path}: expected a COCO-style object with an 'images' list")
    return data


def load_annotations(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[ImageContext]:
    """COCO-style annotation files -> one ImageContext per image (in the files' image order)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    images: dict[str, ImageContext] = {}
    for path in paths:
        data = _read_json(Path(path))
        try:
            cats = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
            for im in data.get("images", []):
                key = str(im["id"])
                if key not in images:
                    images[key] = ImageContext(key, str(im["file_name"]), float(im["width"]), float(im["height"]))
            for ann in list(data.get("annotations", [])) + list(data.get("captions", [])):
                ctx = images.get(str(ann["image_id"]))
                if ctx is None:
                    raise LlavaLocalError(f"{path}: annotation for unknown image id {ann['image_id']!r}")
                if "caption" in ann:
                    cap = " ".join(str(ann["caption"]).split())
                    if cap:
                        ctx.captions.append(cap)
                if "bbox" in ann:
                    x, y, w, h = (float(v) for v in ann["bbox"])
                    if ann["category_id"] not in cats:
                        raise LlavaLocalError(f"{path}: unknown category_id {ann['category_id']!r}")
                    if ctx.width <= 0 or ctx.height <= 0:
                        raise LlavaLocalError(f"{path}: image {ctx.image_id} has no size for its boxes")
                    box = (x / ctx.width, y / ctx.height, (x + w) / ctx.width, (y + h) / ctx.height)
                    ctx.objects.append((cats[ann["category_id"]], tuple(min(1.0, max(0.0, v)) for v in box)))
        except (KeyError, TypeError, ValueError) as exc:
            raise LlavaLocalError(f"{path}: malformed COCO-style annotations ({type(exc).__name__}: {exc})") from None
    return list(images.values())


def symbolic(ctx: ImageContext) -> str:
    """The paper's symbolic representation: captions, then `name: [x0, y0, x1, y1]` per box."""
    lines = list(ctx.captions)
    lines += [f"{name}: [{', '.join(f'{v:.3f}' for v in box)}]" for name, box in ctx.objects]
    return "\n".join(lines)


# --- prompts and few-shot seeds (hand-written, in the style of the paper's table 10-12) ---

_SYSTEM_HEAD = ("You are an AI visual assistant looking at a single image. You are given the image's "
                "captions and its objects with bounding boxes as (x0, y0, x1, y1) in 0-1 coordinates, "
                "top left (0, 0). Answer as if you see the image; never mention captions or coordinates. ")

SYSTEM_PROMPTS = {
    "conversation": _SYSTEM_HEAD + (
        "Write a conversation between a person asking about the image and you answering. Ask about "
        "the objects, their colours, how many there are and where they are. Only ask questions the "
        "image answers for sure. Write 2 to 4 pairs, each as 'Question: ...' then 'Answer: ...'."),
    "detail": _SYSTEM_HEAD + (
        "Describe the image in detail in one paragraph: the objects, their colours, how many there "
        "are and where they are relative to each other."),
    "reasoning": _SYSTEM_HEAD + (
        "Write one question about the image that needs reasoning beyond naming what is visible "
        "(relations between objects, what they suggest), then a clear answer that reasons step by "
        "step. Write it as 'Question: ...' then 'Answer: ...'."),
}

_SEED_CONTEXTS = (
    "A man rides a bicycle down a city street next to a red bus.\n"
    "A cyclist passes a double-decker bus.\n"
    "person: [0.412, 0.301, 0.538, 0.874]\nbicycle: [0.398, 0.552, 0.571, 0.902]\nbus: [0.612, 0.118, 0.998, 0.861]",
    "Two cats sleep on a blue sofa beside a lamp.\n"
    "A living room with two cats curled up on a couch.\n"
    "cat: [0.102, 0.455, 0.371, 0.702]\ncat: [0.398, 0.471, 0.640, 0.698]\ncouch: [0.031, 0.352, 0.815, 0.947]\n"
    "lamp: [0.852, 0.088, 0.979, 0.611]",
)

SEED_RESPONSES = {
    "conversation": (
        "Question: What is the man riding?\nAnswer: The man is riding a bicycle.\n"
        "Question: What vehicle is next to him?\nAnswer: A red double-decker bus is next to him, on the right.\n"
        "Question: Where is the bus?\nAnswer: The bus is on the right side of the image.",
        "Question: How many cats are there?\nAnswer: There are two cats.\n"
        "Question: What are the cats doing?\nAnswer: They are sleeping on a blue sofa.\n"
        "Question: What is to the right of the sofa?\nAnswer: A lamp stands to the right of the sofa.",
    ),
    "detail": (
        "A man rides a bicycle down a city street in the middle of the image. To his right, a large red "
        "double-decker bus fills most of the right side of the picture. The cyclist is much smaller than "
        "the bus and rides close beside it.",
        "A living room with a blue sofa across the lower part of the image. Two cats are curled up asleep "
        "next to each other on the left half of the sofa. A tall lamp stands at the right edge, beside the sofa.",
    ),
    "reasoning": (
        "Question: Why should the cyclist be careful?\nAnswer: He rides right next to a large bus. The bus "
        "is much bigger than him and its driver may not see him, so he should keep his distance.",
        "Question: Why are the cats likely comfortable?\nAnswer: They lie on a soft sofa next to each "
        "other and they are asleep, so the place is warm and quiet for them.",
    ),
}


@dataclass
class DatagenConfig:
    kinds: tuple[str, ...] = KINDS
    per_image: str = "all"          # "all": every kind for every image; "cycle": image i gets kinds[i % k]
    n_seeds: int = 2                # few-shot seed examples per prompt (the paper uses a few per kind)
    max_tokens: dict = field(default_factory=lambda: {"conversation": 160, "detail": 120, "reasoning": 120})
    temperature: float = 0.6        # some variety between images, still mostly on-format for a small teacher
    repeat_penalty: float = 1.1     # small teachers loop ("Question: ... Question: ...") without it
    seed: int = 0                   # per task: seed + crc32(task), so a resumed run makes the same text


def teacher_messages(kind: str, ctx: ImageContext, n_seeds: int = 2) -> list[Message]:
    msgs = [Message("system", SYSTEM_PROMPTS[kind])]
    for c, r in list(zip(_SEED_CONTEXTS, SEED_RESPONSES[kind]))[:n_seeds]:
        msgs += [Message("user", c), Message("assistant", r)]
    msgs.append(Message("user", symbolic(ctx)))
    return msgs


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


# --- the run: tasks, journal, resume ---

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


def tasks_for(images: list[ImageContext], cfg: DatagenConfig) -> list[tuple[str, ImageContext, str]]:
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


def generate_dataset(annotations, images_dir: str | os.PathLike, teacher, out: str | os.PathLike, *,
                     cfg: DatagenConfig = DatagenConfig(), limit: int | None = None,
                     progress: bool = True, on_task: Callable[[dict], None] | None = None) -> DatagenResult:
    """Write LLaVA JSON to `out` from COCO-style `annotations` with `teacher` (a
    llava_local.runtime.text_generation.TextGenerator, or anything with `generate(messages, max_tokens=,
    sampling=)`). `limit` stops after that many newly generated tasks (resume later by calling again)."""
    from tqdm import tqdm

    for k in cfg.kinds:
        if k not in KINDS:
            raise LlavaLocalError(f"unknown kind {k!r} (expected {', '.join(KINDS)})")
    if cfg.per_image not in ("all", "cycle"):
        raise LlavaLocalError(f"per_image must be 'all' or 'cycle', got {cfg.per_image!r}")
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = load_annotations(annotations)
    tasks = tasks_for(images, cfg)
    jpath = journal_path(out)
    done = {e["task"]: e for e in read_journal(jpath)}
    for task, e in done.items():   # journaled records meet today's validator too (rules may have tightened)
        problems = validate_record(e["record"]) if "record" in e else []
        if problems:
            done[task] = {k: v for k, v in e.items() if k != "record"} | {"rejected": "invalid: " + "; ".join(problems)}
    seen = {dedup_key(e["record"]) for e in done.values() if "record" in e}
    todo = [t for t in tasks if t[0] not in done]
    generated = 0
    with open(jpath, "a", encoding="utf-8") as journal, \
            tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="datagen", unit="item",
                 file=sys.stderr, disable=not progress) as bar:
        for task, ctx, kind in todo:
            if limit is not None and generated >= limit:
                break
            entry = _run_task(task, ctx, kind, Path(images_dir), teacher, cfg, seen)
            journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            done[task] = entry
            generated += 1
            bar.update(1)
            if on_task:
                on_task(entry)
    records = [done[t]["record"] for t, _, _ in tasks if t in done and "record" in done[t]]
    complete = all(t in done for t, _, _ in tasks)
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out)
    written = {k: 0 for k in cfg.kinds}
    rejected = {k: 0 for k in cfg.kinds}
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
    return DatagenResult(out, written, rejected, reasons, len(tasks) - len(todo), generated, complete,
                         time.perf_counter() - t0)


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
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)
