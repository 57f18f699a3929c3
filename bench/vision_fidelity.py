"""How far each vision backend's image embeddings are from the exact PyTorch reference.

The `torch` backend is the reference: tests/test_fidelity.py shows it equals transformers'
`get_image_features` (max |Δ| ≤ 1e-5). Every other available backend is compared with it.

    python bench/vision_fidelity.py                         # the embedded demo model, bundled samples
    python bench/vision_fidelity.py --model out/ img1.jpg img2.png
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
    args = ap.parse_args()

    from llava_local.errors import LlavaLocalError
    from llava_local.image.load import load_image
    from llava_local.runtime.llm import LlamaLLM
    from llava_local.runtime.model_source import SAMPLES_DIR, find_model
    from llava_local.vision import create_backend

    pair = find_model(args.model, args.mmproj)
    paths = args.images or sorted(str(p) for p in SAMPLES_DIR.glob("*.png"))
    if not paths:
        print("no images given and no bundled samples", file=sys.stderr)
        return 2
    images = [load_image(p).image for p in paths]
    llm = LlamaLLM(pair.llm_path, n_ctx=256)
    ref = create_backend("torch", pair.mmproj).encode(images)
    print(f"model: {pair.mmproj_path.name}; {len(images)} images, {ref.shape[1]} tokens x {ref.shape[2]}")
    print()
    print("| backend | min cosine | mean cosine | max abs diff |")
    print("|---|---|---|---|")
    for name in args.backends.split(","):
        try:
            be = create_backend(name, pair.mmproj, llm=llm)
            out = be.encode(images)
            be.close()
        except LlavaLocalError as exc:
            print(f"| {name} | unavailable: {exc} | | |")
            continue
        c = cosine(out, ref)
        print(f"| {name} | {c.min():.4f} | {c.mean():.4f} | {np.abs(out - ref).max():.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
