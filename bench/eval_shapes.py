"""Exact-match accuracy of a shapes model through llama.cpp, on the held-out shapes questions.

    python bench/eval_shapes.py                                   # the embedded demo model
    python bench/eval_shapes.py --model out/ --n-images 100 --json

The held-out split (train/shapes.py `eval_records`) is regenerated from its seed: scenes that the
demo build never trains on (it skips their signatures). Each image gets one question of each kind
the acceptance counts (colour, count, shape, position), plus one relational "reasoning" question,
reported apart. The model runs as a user runs it: the quantized LLM GGUF on llama.cpp, the image
through the mmproj's CLIP + projector (vision backend "torch", the exact one), greedy decoding.
Answers are compared after `normalize_answer` (case, trailing punctuation, articles, number words).
The evaluation itself is llava_local/eval/shapes.py's, the one `llava-local eval --shapes` runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llava_local.eval.shapes import evaluate_shapes  # noqa: E402
from llava_local.runtime.engine import Engine  # noqa: E402
from llava_local.runtime.model_pair import resolve_pair  # noqa: E402
from train.shapes import shapes_data  # noqa: E402

DEFAULT_MODEL = REPO / "llava_local" / "data" / "demo"


def evaluate(model: str | Path, *, n_images: int | None = None, seed: int | None = None,
             vision_backend: str = "torch", threads: int | None = None, progress: bool = True,
             repack: bool = False) -> dict:
    pair = resolve_pair(model)
    data = shapes_data()
    split = data.split(pair.manifest, n_images=n_images, seed=seed)
    if split.warning():
        print(f"warning: {split.warning()}", file=sys.stderr)
    # without --repack LlamaLLM decides (on unless the once-per-CPU probe saw SIGILL)
    engine = Engine(pair, vision_backend=vision_backend, n_ctx=512, threads=threads,
                    extra_bufts=True if repack else None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shapes = data.held_out(split, Path(tmp))
            done = 0

            def tick(_item) -> None:
                nonlocal done
                done += 1
                if progress and done % 100 == 0:
                    print(f"{done}/{len(shapes.questions)}", file=sys.stderr)

            res = evaluate_shapes(engine, shapes, on_item=tick)
    finally:
        engine.close()
    return {
        "model": str(pair.llm_path.name), "mmproj": str(pair.mmproj_path.name), "vision_backend": vision_backend,
        "n_images": split.n_images, "seed": split.seed, "n_questions": len(res.graded()),
        "accuracy": res.accuracy(), "per_kind": res.per_category(), "seconds": round(res.seconds, 1),
        "errors": [{"id": it.question.id, "kind": it.question.category, "question": it.question.question,
                    "answer": it.question.answer, "prediction": it.prediction, "correct": it.correct}
                   for it in res.items if not it.correct],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory (pair + manifest)")
    ap.add_argument("--n-images", type=int, default=None, help="held-out images (default: the manifest's, else 100)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--vision-backend", default="torch", choices=["torch", "mtmd"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repack", action="store_true",
                    help="let llama.cpp repack weights for its CPU extra kernels (AMX...): faster where they run")
    ap.add_argument("--json", action="store_true", help="print the full result (with every error) as JSON")
    a = ap.parse_args()
    res = evaluate(a.model, n_images=a.n_images, seed=a.seed, vision_backend=a.vision_backend, threads=a.threads,
                   repack=a.repack)
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(f"model {res['model']} + {res['mmproj']} (vision backend {res['vision_backend']})")
    kinds = shapes_data().eval_kinds
    print(f"exact match: {res['accuracy']:.1%} on {res['n_questions']} questions "
          f"({', '.join(kinds)}; {res['n_images']} held-out images, seed {res['seed']})")
    for kind, v in res["per_kind"].items():
        note = "" if kind in kinds else "   (not in the overall figure)"
        print(f"  {kind:<10} {v['accuracy']:6.1%}  n={v['n']}{note}")
    for e in res["errors"][:10]:
        print(f"  wrong: {e['question']!r} -> {e['prediction']!r} (expected {e['answer']!r})")
    print(f"{res['seconds']}s")


if __name__ == "__main__":
    main()
