"""Exact-match accuracy of a shapes model through llama.cpp, on the held-out shapes questions.

    python bench/eval_shapes.py                                   # the embedded demo model
    python bench/eval_shapes.py --model out/ --n-images 100 --json

The held-out split (train/shapes.py `eval_records`) is regenerated from its seed: scenes that the
demo build never trains on (it skips their signatures). Each image gets one question of each kind
the acceptance counts (colour, count, shape, position), plus one relational "reasoning" question,
reported apart. The model runs as a user runs it: the quantized LLM GGUF on llama.cpp, the image
through the mmproj's CLIP + projector (vision backend "torch", the exact one), greedy decoding.
Answers are compared after `normalize_answer` (case, trailing punctuation, articles, number words).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llava_local.runtime.engine import Engine  # noqa: E402
from llava_local.runtime.model_pair import resolve_pair  # noqa: E402
from llava_local.runtime.sampling import SamplingParams  # noqa: E402
from train.shapes import EVAL_KINDS, eval_records, exact_match, write_eval_images  # noqa: E402

DEFAULT_MODEL = REPO / "llava_local" / "data" / "demo"


def evaluate(model: str | Path, *, n_images: int | None = None, seed: int | None = None,
             vision_backend: str = "torch", threads: int | None = None, progress: bool = True,
             repack: bool = False) -> dict:
    if repack:   # by default LlamaLLM decides (on unless the once-per-CPU probe saw SIGILL)
        os.environ["LLAVA_LOCAL_EXTRA_BUFTS"] = "1"
    pair = resolve_pair(model)
    held_out = (pair.manifest or {}).get("shapes_eval", {})
    n_images = n_images or held_out.get("n_images", 100)
    seed = held_out.get("seed", 0) if seed is None else seed
    if held_out and n_images > held_out.get("n_images", n_images):
        print(f"warning: only the first {held_out['n_images']} evaluation images are held out of training",
              file=sys.stderr)
    records = eval_records(n_images, seed)
    engine = Engine(pair, vision_backend=vision_backend, n_ctx=512, threads=threads)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_eval_images(records, Path(tmp))
        for i, r in enumerate(records):
            ans = engine.ask(r["question"], [Path(tmp) / r["image"]], max_tokens=16,
                             sampling=SamplingParams(temperature=0.0))
            rows.append({"id": r["id"], "kind": r["kind"], "question": r["question"], "answer": r["answer"],
                         "prediction": ans.text.strip(), "correct": exact_match(ans.text, r["answer"])})
            if progress and (i + 1) % 100 == 0:
                print(f"{i + 1}/{len(records)}", file=sys.stderr)
    engine.close()
    by_kind = defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row["correct"])
    scored = [row["correct"] for row in rows if row["kind"] in EVAL_KINDS]
    return {
        "model": str(pair.llm_path.name), "mmproj": str(pair.mmproj_path.name), "vision_backend": vision_backend,
        "n_images": n_images, "seed": seed, "n_questions": len(scored),
        "accuracy": sum(scored) / len(scored),
        "per_kind": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in by_kind.items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "errors": [row for row in rows if not row["correct"]],
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
    print(f"exact match: {res['accuracy']:.1%} on {res['n_questions']} questions "
          f"({', '.join(EVAL_KINDS)}; {res['n_images']} held-out images, seed {res['seed']})")
    for kind, v in res["per_kind"].items():
        note = "" if kind in EVAL_KINDS else "   (not in the overall figure)"
        print(f"  {kind:<10} {v['accuracy']:6.1%}  n={v['n']}{note}")
    for e in res["errors"][:10]:
        print(f"  wrong: {e['question']!r} -> {e['prediction']!r} (expected {e['answer']!r})")
    print(f"{res['seconds']}s")


if __name__ == "__main__":
    main()
