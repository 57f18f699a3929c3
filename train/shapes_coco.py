"""Shapes scenes as COCO-style annotations + PNG images: the input `llava-local datagen` reads,
so the whole GPT-assisted data path runs offline on synthetic images.

    python -m train.shapes_coco --out /tmp/shapes-coco --n 20
    llava-local datagen --annotations /tmp/shapes-coco/annotations.json --images /tmp/shapes-coco \\
        --teacher .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -o /tmp/shapes-coco/instruct.json

Each scene gives one COCO image, one box annotation per shape (category "<colour> <shape>", bbox
[x, y, w, h] in pixels) and two captions (train/shapes.py's short caption and its description),
in the same file: COCO instances + COCO-captions style ("annotations" entries with "caption").
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from .shapes import COLOURS, RENDER_SIZE, SHAPES, _write_json, caption, description, random_scene, render

CATEGORIES = [f"{c} {s}" for c in COLOURS for s in SHAPES]   # one COCO category per colour + shape


def write_shapes_coco(out: str | os.PathLike, n: int, seed: int = 0) -> Path:
    """Render `n` distinct shapes scenes into out/images/ and write out/annotations.json (returned)."""
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 7_000_001)      # apart from write_dataset's and eval_records' streams
    cat_id = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    images, annotations, seen = [], [], set()
    while len(images) < n:
        sc = random_scene(rng)
        if sc.signature() in seen:
            continue
        seen.add(sc.signature())
        i = len(images)
        name = f"images/shapes-{i:06d}.png"
        render(sc).save(root / name, optimize=False, compress_level=1)
        images.append({"id": i, "file_name": name, "width": RENDER_SIZE, "height": RENDER_SIZE})
        for cap in (caption(sc), description(sc)):
            annotations.append({"id": len(annotations), "image_id": i, "caption": cap})
        for s in sc.shapes:
            x0, y0, x1, y1 = s.box
            annotations.append({"id": len(annotations), "image_id": i, "category_id": cat_id[s.name],
                                "bbox": [x0, y0, x1 - x0, y1 - y0]})
    path = root / "annotations.json"
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in cat_id.items()]}
    _write_json(path, data)
    return path


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_shapes_coco(a.out, a.n, a.seed))


if __name__ == "__main__":
    main()
