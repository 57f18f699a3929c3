"""The shapes world: synthetic images of 1-4 coloured shapes on a coloured background, with
captions, bounding boxes and question/answer sets of the paper's three kinds, a held-out
evaluation split and an exact-match scorer. The demo model (demo_model.py) is trained on it.

    python -m train.shapes --out /tmp/shapes --train 2000 --eval 100    # LLaVA JSON + PNG images
    # or: llava-local train shapes --out /tmp/shapes

A scene puts each shape in its own cell of a 2x2 grid (with jitter in size and place), so every
position question has one canonical answer. Questions only refer to objects the question
singles out uniquely; answers are short and canonical ("Red.", "3.", "A circle.", "Top left."),
so exact match after `normalize_answer` is a meaningful score.

Kinds (the paper's three: conversation, detailed description, complex reasoning):
- conversation: "colour", "shape", "count", "position" (the four evaluated kinds)
- "description": "Describe the image in detail." -> one sentence per shape
- "reasoning": relations between shapes ("What shape is left of the red one?")

The questions about one image are stored as one LLaVA record with `"independent_turns": true`
(an extension train/data.py understands): each turn is trained as its own single-turn
conversation, since in a real multi-turn context the questions would leak each other's answers.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from llava_local.fileio import atomic_write

RENDER_SIZE = 224          # pixels of the stored PNG; the demo CLIP sees it resized to 112
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {                # shape colours: saturated, far apart in RGB
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225),
    "yellow": (240, 215, 45), "purple": (140, 60, 190), "orange": (245, 140, 30),
}
BACKGROUNDS = {            # background colours: named apart from the shape colours
    "white": (245, 245, 245), "grey": (128, 128, 128), "black": (25, 25, 25),
    "beige": (225, 205, 165), "pink": (250, 190, 210), "teal": (40, 128, 128),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")   # cell index = 2 * row + col
EVAL_KINDS = ("colour", "shape", "count", "position")                  # scored by bench/eval_shapes.py


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    cell: int                         # 0..3 -> POSITIONS
    box: tuple[int, int, int, int]    # x0, y0, x1, y1 in RENDER_SIZE pixels

    @property
    def row(self) -> int:
        return self.cell // 2

    @property
    def col(self) -> int:
        return self.cell % 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]         # in reading order (cell order)
    seed: int                         # renders the same pixels again (colour jitter)

    def signature(self) -> str:
        """What the questions depend on: equal signatures are the same scene for evaluation."""
        return "|".join([self.background] + [f"{s.colour} {s.shape} {s.cell}" for s in self.shapes])


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


# --- scenes and pixels ---

def random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(range(4), n))
    half = RENDER_SIZE // 2
    shapes = []
    for cell in cells:
        size = rng.randint(72, 98)                     # 36-49 px (2.6-3.5 patches of 14 px) at the model's 112 px
        x0 = (cell % 2) * half + rng.randint(6, half - 6 - size)
        y0 = (cell // 2) * half + rng.randint(6, half - 6 - size)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), cell, (x0, y0, x0 + size, y0 + size)))
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(shapes), rng.randrange(2**31))


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 14) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _star(box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    return [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
             cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]


def render(scene: Scene) -> Image.Image:
    """The scene as a RENDER_SIZE x RENDER_SIZE RGB image (deterministic given the scene)."""
    rng = random.Random(scene.seed)
    img = Image.new("RGB", (RENDER_SIZE, RENDER_SIZE), _jitter(BACKGROUNDS[scene.background], rng, 10))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = _jitter(COLOURS[s.colour], rng)
        x0, y0, x1, y1 = s.box
        if s.shape == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.shape == "square":
            inset = (x1 - x0) // 10                    # a square's area looks like the circle's
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
        elif s.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon(_star(s.box), fill=fill)
    return img


# --- language ---

def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    """Short caption (stage-1 alignment data): the shapes in reading order and the background."""
    return _cap(_join([_article(s.name) for s in scene.shapes])) + f" on {_article(scene.background)} background."


def description(scene: Scene) -> str:
    """Detailed description: count, background, and where each shape is."""
    n = len(scene.shapes)
    head = f"There {'is' if n == 1 else 'are'} {n} shape{'' if n == 1 else 's'} on {_article(scene.background)} background."
    return head + "".join(f" {_cap(_article(s.name))} is at the {POSITIONS[s.cell]}." for s in scene.shapes)


def scene_text(scene: Scene) -> str:
    """The scene as text, cell by cell: what the demo LLM reads before it ever sees an image
    (its language warm-up teaches it to look things up in a description like this one)."""
    cells = {s.cell: s for s in scene.shapes}
    parts = [f"{_cap(p)}: {_article(cells[i].name) if i in cells else 'nothing'}." for i, p in enumerate(POSITIONS)]
    return " ".join(parts) + f" Background: {scene.background}."


def _pick(rng: random.Random, *variants: str) -> str:
    return rng.choice(variants)


_RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}   # (d_row, d_col)


def _neighbour_cell(s: Shape, relation: str) -> int | None:
    """The grid cell left of / right of / above / below `s` (None: outside the 2x2 grid)."""
    dr, dc = _RELATIONS[relation]
    row, col = s.row + dr, s.col + dc
    return 2 * row + col if 0 <= row < 2 and 0 <= col < 2 else None


def questions(scene: Scene, rng: random.Random) -> list[QA]:
    """Every question the scene answers unambiguously (one phrasing each, picked by rng)."""
    out: list[QA] = []
    shapes = scene.shapes
    by_shape = {k: [s for s in shapes if s.shape == k] for k in SHAPES}
    by_colour = {c: [s for s in shapes if s.colour == c] for c in COLOURS}
    by_name: dict[str, list[Shape]] = {}
    for s in shapes:
        by_name.setdefault(s.name, []).append(s)
    colour_word = _pick(rng, "colour", "color")

    # conversation: colour
    for k, found in by_shape.items():
        if len(found) == 1:
            out.append(QA("colour", _pick(rng, f"What {colour_word} is the {k}?", f"Which {colour_word} is the {k}?"),
                          _cap(found[0].colour) + "."))
    out.append(QA("colour", f"What {colour_word} is the background?", _cap(scene.background) + "."))
    # conversation: shape
    for c, found in by_colour.items():
        if len(found) == 1:
            out.append(QA("shape", _pick(rng, f"What shape is the {c} one?", f"What is the shape of the {c} object?"),
                          _cap(_article(found[0].shape)) + "."))
    for s in shapes:
        out.append(QA("shape", f"What shape is at the {POSITIONS[s.cell]}?", _cap(_article(s.shape)) + "."))
    # conversation: count
    out.append(QA("count", _pick(rng, "How many shapes are there?", "How many shapes are in the image?"),
                  f"{len(shapes)}."))
    for k in rng.sample(SHAPES, 2):
        out.append(QA("count", f"How many {k}s are there?", f"{len(by_shape[k])}."))
    # conversation: position
    for name, found in by_name.items():
        if len(found) == 1:
            out.append(QA("position", _pick(rng, f"Where is the {name}?", f"Where is the {name} located?"),
                          _cap(POSITIONS[found[0].cell]) + "."))
    # complex reasoning: relations between uniquely named shapes
    for name, found in by_name.items():
        if len(found) != 1:
            continue
        for relation in _RELATIONS:
            cell = _neighbour_cell(found[0], relation)
            if cell is None:
                continue
            other = next((o for o in shapes if o.cell == cell), None)
            if rng.random() < 0.5:
                q = f"What shape is {relation} the {name}?"
                a = _cap(_article(other.shape)) + "." if other else "Nothing."
            else:
                q = f"What {colour_word} is the shape {relation} the {name}?"
                a = _cap(other.colour) + "." if other else "Nothing."
            out.append(QA("reasoning", q, a))
    return out


def conversation(scene: Scene, rng: random.Random, n_turns: int) -> list[QA]:
    """A multi-turn instruction conversation: a mix of kinds, sometimes a detailed description."""
    pool = questions(scene, rng)
    by_kind: dict[str, list[QA]] = {}
    for qa in pool:
        by_kind.setdefault(qa.kind, []).append(qa)
    picked = []
    kinds = list(by_kind)
    for _ in range(n_turns):          # kinds round-robin in random order, so rare kinds appear
        if not kinds:
            break
        k = rng.choice(kinds)
        qa = by_kind[k].pop(rng.randrange(len(by_kind[k])))
        picked.append(qa)
        if not by_kind[k]:
            kinds.remove(k)
    if rng.random() < 0.25:
        picked.insert(rng.randrange(len(picked) + 1),
                      QA("description", _pick(rng, "Describe the image in detail.", "Describe this picture."),
                         description(scene)))
    return picked


# --- scoring ---

# --- datasets on disk (LLaVA JSON) ---

@dataclass(frozen=True)
class ShapesSplit:
    """Paths written by `write_dataset`."""
    root: Path
    captions: Path        # stage 1: one image-caption pair per image (LLaVA JSON)
    instruct: Path        # stage 2: multi-turn instruction conversations (LLaVA JSON)
    text: Path            # text-only: the scene written out (scene_text), then questions: the LLM warm-up
    scenes: Path          # [{"image", "scene"}] of the training images (boxes included), for CLIP pre-training
    eval: Path            # held-out single questions: [{"id","image","kind","question","answer"}]


def _human(question: str, with_image: bool, rng: random.Random) -> str:
    if not with_image:
        return question
    return rng.choice(("<image>\n" + question, question + "\n<image>"))   # the marker may sit anywhere


def _llava_record(rid: str, image: str | None, qas: list[QA], rng: random.Random) -> dict:
    conv = []
    for i, qa in enumerate(qas):
        conv.append({"from": "human", "value": _human(qa.question, i == 0 and image is not None, rng)})
        conv.append({"from": "gpt", "value": qa.answer})
    rec = {"id": rid, "conversations": conv}
    if len(qas) > 1:
        # the questions give each other away ("Where is the red circle?" answers "What colour is the
        # circle?"): trained as separate single-turn conversations sharing the image (train/data.py)
        rec["independent_turns"] = True
    if image is not None:
        rec["image"] = image
    return rec


def _write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=0).encode("utf-8"))   # indent 0: one item a line, small files


def eval_records(n_images: int, seed: int = 0) -> list[dict]:
    """The held-out split: `n_images` distinct scenes, one question of each kind per scene
    (EVAL_KINDS, then "reasoning"). Deterministic in (n_images, seed); images not rendered yet."""
    rng = random.Random(seed + 1_000_003)
    out, seen = [], set()
    while len(seen) < n_images:
        sc = random_scene(rng)
        if sc.signature() in seen:
            continue
        seen.add(sc.signature())
        j = len(seen) - 1
        pool = questions(sc, rng)
        for kind in EVAL_KINDS + ("reasoning",):
            cands = [qa for qa in pool if qa.kind == kind]
            if not cands:      # a single shape has no neighbours: no reasoning question
                continue
            qa = rng.choice(cands)
            out.append({"id": f"eval-{j}-{kind}", "image": f"images/eval-{j:06d}.png", "kind": kind,
                        "question": qa.question, "answer": qa.answer, "signature": sc.signature(),
                        "scene": asdict(sc)})
    return out


def scene_from_dict(d: dict) -> Scene:
    return Scene(d["background"], tuple(Shape(s["shape"], s["colour"], s["cell"], tuple(s["box"])) for s in d["shapes"]),
                 d["seed"])


def write_eval_images(records: list[dict], root: Path) -> None:
    for r in records:
        path = Path(root) / r["image"]
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            render(scene_from_dict(r["scene"])).save(path, optimize=False, compress_level=1)


def write_dataset(out: str | os.PathLike, *, n_train: int, n_eval: int, seed: int = 0,
                  turns: tuple[int, int] = (3, 6), n_text: int = 0) -> ShapesSplit:
    """Render `n_train` training images (each with a caption and an instruction conversation) and
    `n_eval` held-out images (one question per kind each, plus a reasoning question), as PNG files
    and LLaVA JSON. Held-out scenes never share a signature with a training scene."""
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    evals = eval_records(n_eval, seed)
    held_out = {r["signature"] for r in evals}
    captions, instruct, text, scenes = [], [], [], []
    i = 0
    while len(captions) < n_train:
        sc = random_scene(rng)
        if sc.signature() in held_out:
            continue
        name = f"images/train-{i:06d}.png"
        render(sc).save(root / name, optimize=False, compress_level=1)
        scenes.append({"image": name, "scene": asdict(sc)})
        captions.append(_llava_record(f"cap-{i}", name, [QA("caption", _pick(
            rng, "Describe the image briefly.", "Give a short caption.", "What is in the picture?"), caption(sc))], rng))
        instruct.append(_llava_record(f"conv-{i}", name, conversation(sc, rng, rng.randint(*turns)), rng))
        i += 1
    for j in range(n_text):      # text-only: the scene written out where the image would be
        sc = random_scene(rng)
        qas = [QA("caption", "Describe the image briefly.", caption(sc))] + conversation(sc, rng, rng.randint(*turns))
        rec = _llava_record(f"text-{j}", None, qas, rng)
        rec["conversations"][0]["value"] = scene_text(sc) + "\n" + rec["conversations"][0]["value"]
        text.append(rec)
    write_eval_images(evals, root)
    split = ShapesSplit(root, root / "captions.json", root / "instruct.json", root / "text.json",
                        root / "scenes.json", root / "eval.json")
    _write_json(split.scenes, scenes)
    _write_json(split.captions, captions)
    _write_json(split.instruct, instruct)
    _write_json(split.text, text)
    _write_json(split.eval, evals)
    return split


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    split = write_dataset(a.out, n_train=a.train, n_eval=a.eval, seed=a.seed)
    print(split.root)


if __name__ == "__main__":
    main()


def shapes_data(**fields):
    """This held-out split as llava_local/eval's ShapesData (eval/ never imports train/: `llava-local
    eval --shapes`, eval-quant and bench/eval_shapes.py hand it in); `fields` override ShapesData's."""
    from llava_local.eval.shapes import ShapesData
    return ShapesData(eval_records, write_eval_images, EVAL_KINDS, **fields)
