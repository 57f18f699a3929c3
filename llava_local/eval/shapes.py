"""The shapes held-out evaluation, defined once: bench/eval_shapes.py, `llava-local eval --shapes`
and `llava-local eval-quant` (its accuracy column) all score through `evaluate_shapes`.

    data = shapes_data()                                   # train/shapes.py, handed in by the caller
    split = data.split(pair.manifest, n_images=100)        # seed and size of the manifest's split
    res = evaluate_shapes(engine, data.held_out(split, root))   # images rendered under root
    res.accuracy()                                         # over colour, shape, count, position

The held-out split (train/shapes.py `eval_records`) is regenerated from its seed: scenes that the
demo build never trains on (it skips their signatures). Each image gets one question of each kind
the figure counts (colour, count, shape, position), plus one relational "reasoning" question,
reported apart. The model answers as a user runs it, one fresh conversation per question, greedy,
at most 16 tokens; answers are compared after `normalize_answer` (case, trailing punctuation,
articles, number words). This package never imports train/: the caller hands the data in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from llava_local.eval.evaluate import EvalResult, ItemResult, evaluate
from llava_local.eval.questions import Question
from llava_local.runtime.sampling import SamplingParams

ANSWER_TOKENS = 16                        # the answers are a few words
GREEDY = SamplingParams(temperature=0.0)
DEFAULT_IMAGES = 100                      # the demo model's held-out images (train/demo_model.py n_eval)


@dataclass(frozen=True)
class ShapesSplit:
    """The first `n_images` held-out images of the split drawn with `seed`."""
    n_images: int
    seed: int
    held_out: int | None = None           # images the model's training left out; None: not known
    from_model: bool = False              # the model names this split: it is a shapes model

    def warning(self, n_images: int | None = None) -> str | None:
        """Set when the evaluation reaches past the images held out of training."""
        n = self.n_images if n_images is None else n_images
        if self.held_out is not None and n > self.held_out:
            return f"only the first {self.held_out} evaluation images are held out of training"
        return None


@dataclass
class ShapesSet:
    questions: list[Question]             # image: a rendered PNG; category: the question's kind
    kinds: tuple[str, ...]                # the kinds the headline figure counts ("reasoning" apart)


@dataclass(frozen=True)
class ShapesData:
    """train/shapes.py's held-out data, handed in by the caller (train/shapes.py `shapes_data`)."""
    eval_records: Callable[[int, int], list[dict]]     # (n_images, seed) -> records, prefix-stable in n_images
    write_images: Callable[[list[dict], Path], None]   # render each record's image under a root
    eval_kinds: tuple[str, ...]                        # the scored kinds
    # manifest name -> {"seed", "n_images"}: models trained around the split whose manifest does not
    # say so (a `convert` of the demo checkpoint writes no "shapes_eval")
    trained_on: Mapping[str, dict] = field(default_factory=dict)

    def split(self, manifest: dict | None, *, n_images: int | None = None, seed: int | None = None) -> ShapesSplit:
        """The model's split (its manifest's "shapes_eval", or `trained_on` by name); n_images and
        seed override it; without one, 100 images drawn with seed 0."""
        m = manifest or {}
        held = m["shapes_eval"] if "shapes_eval" in m else self.trained_on.get(m.get("name"))
        known = held is not None
        held = dict(held or {})
        return ShapesSplit(n_images or held.get("n_images", DEFAULT_IMAGES),
                           held.get("seed", 0) if seed is None else seed, held.get("n_images"), known)

    def questions(self, records: Sequence[dict], root: Path) -> ShapesSet:
        """`records` as questions, their images written under `root`."""
        root = Path(root)
        self.write_images(list(records), root)
        return ShapesSet([Question(r["id"], str(root / r["image"]), r["question"], r["answer"], None, r["kind"])
                          for r in records], tuple(self.eval_kinds))

    def held_out(self, split: ShapesSplit, root: Path, *, limit: int | None = None) -> ShapesSet:
        """Every question of the split's images (the scored kinds and "reasoning"), the first `limit`."""
        return self.questions(self.eval_records(split.n_images, split.seed)[:limit], root)

    def scored(self, n_questions: int, seed: int, root: Path) -> ShapesSet:
        """The first `n_questions` questions of the scored kinds (len(eval_kinds) per image)."""
        n_images = max(1, math.ceil(n_questions / len(self.eval_kinds)))
        while True:   # eval_records is prefix-stable in n_images
            recs = [r for r in self.eval_records(n_images, seed) if r["kind"] in self.eval_kinds]
            if len(recs) >= n_questions:
                return self.questions(recs[:n_questions], root)
            n_images += 1

    def scenes(self, n_images: int, seed: int, root: Path) -> list[Path]:
        """`n_images` distinct held-out scenes as images (eval-quant's pictures for other models)."""
        first = list({r["image"]: r for r in self.eval_records(n_images, seed)}.values())
        return [Path(q.image) for q in self.questions(first, root).questions]


def evaluate_shapes(engine, shapes: ShapesSet, *, max_tokens: int = ANSWER_TOKENS,
                    sampling: SamplingParams = GREEDY,
                    on_item: Callable[[ItemResult], None] | None = None) -> EvalResult:
    """THE shapes held-out evaluation: every question through `engine`, exact match, the headline
    accuracy over the scored kinds."""
    res = evaluate(engine, shapes.questions, max_tokens=max_tokens, sampling=sampling, on_item=on_item)
    res.headline_kinds = shapes.kinds
    return res
