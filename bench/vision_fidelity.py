"""How far each vision backend's image embeddings are from the exact PyTorch reference.

The `torch` backend is the reference: tests/test_fidelity.py shows it equals transformers'
`get_image_features` (max |Δ| ≤ 1e-5; on LLaVA-1.6, tests/test_anyres_vision.py: the packed features,
max |Δ| ≤ 1e-4). Every other available backend is compared with it.

On a LLaVA-1.6 ("anyres") model upstream llama.cpp's graph (`mtmd`) does not even produce the same
number of tokens: it feeds the base image and the raw tiles, with no unpadding and no image_newline.
The table then gives both counts and compares what both have in the same place, the base image's
tokens (the first `image_tokens` of each); "all tokens" is only measured where the counts agree.

    python bench/vision_fidelity.py                         # the embedded demo model, bundled samples
    python bench/vision_fidelity.py --model out/ img1.jpg img2.png
    python bench/vision_fidelity.py --tiny-llava-next       # a tiny random LLaVA-1.6, built and converted here
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*")
    ap.add_argument("--model", default=None)
    ap.add_argument("--mmproj", default=None)
    ap.add_argument("--backends", default="mtmd,onnx,native")
    ap.add_argument("--tiny-llava-next", action="store_true",
                    help="build a tiny random LLaVA-1.6 (transformers LlavaNext) in a temporary directory and use it")
    args = ap.parse_args()
    if args.tiny_llava_next:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            args.model = _tiny_llava_next(tmp)
            return _run(args)
    return _run(args)


def _tiny_llava_next(tmp: str) -> str:
    from pathlib import Path

    from convert import convert
    from train.tiny_models import build_tiny_llava_next
    _, hf_dir = build_tiny_llava_next(Path(tmp) / "hf")
    return str(convert(hf_dir, Path(tmp) / "out", outtype="f32", onnx=True).llm_path.parent)


def _run(args) -> int:

    from llava_local.errors import LlavaLocalError
    from llava_local.image.load import load_image
    from llava_local.runtime.llm import LlamaLLM
    from llava_local.runtime.model_source import SAMPLES_DIR, find_model
    from llava_local.vision import create_backend

    pair = find_model(args.model, args.mmproj)
    paths = args.images or sorted(str(p) for p in SAMPLES_DIR.glob("*.png"))
    if not args.images and pair.mmproj.anyres:   # the samples are all square: add other aspects
        paths = paths[:2] + _aspect_images()
    if not paths:
        print("no images given and no bundled samples", file=sys.stderr)
        return 2
    images = [p if not isinstance(p, str) else load_image(p).image for p in paths]
    llm = LlamaLLM(pair.llm_path, n_ctx=256)
    ref = create_backend("torch", pair.mmproj).embed(images)
    n_base = pair.mmproj.image_tokens
    kind = "LLaVA-1.6 (anyres)" if pair.mmproj.anyres else "LLaVA-1.5"
    print(f"model: {pair.mmproj_path.name} ({kind}); {len(images)} images, {ref[0].shape[1]}-wide embeddings, "
          f"reference tokens per image: {', '.join(str(len(r)) for r in ref)}")
    print()
    print("| backend | tokens per image (reference / backend) | base image: min cosine | mean cosine | "
          "all tokens: min cosine | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name in args.backends.split(","):
        try:
            be = create_backend(name, pair.mmproj, llm=llm)
            out = be.embed(images)
            be.close()
        except LlavaLocalError as exc:
            print(f"| {name} | unavailable: {exc} | | | | |")
            continue
        counts = ", ".join(f"{len(r)}/{len(o)}" for r, o in zip(ref, out))
        base = np.concatenate([cosine(o[:n_base], r[:n_base]) for o, r in zip(out, ref)])
        same = all(o.shape == r.shape for o, r in zip(out, ref))
        if same:
            c = np.concatenate([cosine(o, r) for o, r in zip(out, ref)])
            d = max(float(np.abs(o - r).max()) for o, r in zip(out, ref))
            whole = f"{c.min():.4f} | {d:.3g}"
        else:
            whole = "counts differ | counts differ"
        print(f"| {name} | {counts} | {base.min():.4f} | {base.mean():.4f} | {whole} |")
    return 0


def _aspect_images():
    """Random images of the aspects LLaVA-1.6 tiles differently (2:1, 1:3, 5:4, a thin strip)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in
            ((160, 80), (50, 150), (100, 80), (20, 300))]


if __name__ == "__main__":
    sys.exit(main())
