"""The image as text for a teacher that never sees it: COCO-style annotations -> captions and boxes,
and the paper's *symbolic representation* of them (section 3 of the LLaVA paper).

    images = load_annotations(["instances_val2017.json", "captions_val2017.json"])
    symbolic(images[0])      # "A man rides a bicycle.\nperson: [0.412, 0.301, 0.538, 0.874]\n..."

Input (one or more COCO-style JSON files, merged by image id):
    {"images": [{"id", "file_name", "width", "height"}],
     "annotations": [{"image_id", "bbox": [x, y, w, h], "category_id"}     # instances (pixels)
                     | {"image_id", "caption"}],                           # COCO-captions style
     "categories": [{"id", "name"}],
     "captions": [{"image_id", "caption"}]}                                # optional, same as above
so COCO's instances_*.json and captions_*.json can be passed together. Boxes become
`name: [x0, y0, x1, y1]`, normalised to [0, 1] with 3 decimals.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import TrainDataError


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
        raise TrainDataError(f"{path}: cannot read annotations ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images", []), list):
        raise TrainDataError(f"{path}: expected a COCO-style object with an 'images' list")
    return data


def _add_annotation(path: Path, ctx: ImageContext, ann: dict, cats: dict) -> None:
    """One caption and/or box of `ctx`'s image."""
    if "caption" in ann:
        cap = " ".join(str(ann["caption"]).split())
        if cap:
            ctx.captions.append(cap)
    if "bbox" in ann:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if ann["category_id"] not in cats:
            raise TrainDataError(f"{path}: unknown category_id {ann['category_id']!r}")
        if ctx.width <= 0 or ctx.height <= 0:
            raise TrainDataError(f"{path}: image {ctx.image_id} has no size for its boxes")
        box = (x / ctx.width, y / ctx.height, (x + w) / ctx.width, (y + h) / ctx.height)
        ctx.objects.append((cats[ann["category_id"]], tuple(min(1.0, max(0.0, v)) for v in box)))


def _merge_file(path: Path, data: dict, images: dict[str, ImageContext]) -> None:
    """Add one file's images, captions and boxes to `images` (image id -> context)."""
    cats = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
    for im in data.get("images", []):
        key = str(im["id"])
        if key not in images:
            images[key] = ImageContext(key, str(im["file_name"]), float(im["width"]), float(im["height"]))
    for ann in list(data.get("annotations", [])) + list(data.get("captions", [])):
        ctx = images.get(str(ann["image_id"]))
        if ctx is None:
            raise TrainDataError(f"{path}: annotation for unknown image id {ann['image_id']!r}")
        _add_annotation(path, ctx, ann, cats)


def load_annotations(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[ImageContext]:
    """COCO-style annotation files -> one ImageContext per image (in the files' image order)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    images: dict[str, ImageContext] = {}
    for path in paths:
        data = _read_json(Path(path))
        try:
            _merge_file(path, data, images)
        except TrainDataError:          # already names what is wrong (it is a ValueError too)
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainDataError(f"{path}: malformed COCO-style annotations ({type(exc).__name__}: {exc})") from None
    return list(images.values())


def symbolic(ctx: ImageContext) -> str:
    """The paper's symbolic representation: captions, then `name: [x0, y0, x1, y1]` per box."""
    lines = list(ctx.captions)
    lines += [f"{name}: [{', '.join(f'{v:.3f}' for v in box)}]" for name, box in ctx.objects]
    return "\n".join(lines)
