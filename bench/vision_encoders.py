"""Images/s of the vision backends on a LLaVA-1.5-sized encoder (CLIP ViT-L/14-336 + mlp2x_gelu to 4096).

    python bench/vision_encoders.py                          # F16, batch 1 and 8, all CPU threads
    python bench/vision_encoders.py --outtypes f16,f32 --threads 2 --batches 1,8 --json out.json
    python bench/vision_encoders.py --threads 1 --batches 1 --backends native,mtmd --native-variants
    python bench/vision_encoders.py --vision-device gpu --batches 1,8,32 --backends native,mtmd   # CUDA/Metal build

The model has random weights and the real LLaVA-1.5 vision cost: CLIP ViT-L/14 at 336 px (24
layers, 23 run for feature layer -2, width 1024, 16 heads, MLP 4096, 577 positions) and the
projector 1024 -> 4096 -> 4096. The LLM is a 1-layer Llama of width 4096 (tied embeddings, small
MLP): mtmd needs an LLM to bind to and the projector's output width must equal the LLM's. It is
built and converted once into --work-dir (about 2 GB) and reused.

Every backend encodes the same 336x336 PIL images through `VisionBackend.encode` (preprocessing
included) on the CPU, or with --vision-device gpu on the GPU of llama.cpp's build (torch: CUDA).
`mtmd` encodes one image per call (libmtmd has no batch API); `native` runs the batch as one graph;
`onnx` runs the F32 ONNX export (whatever --outtypes says). All backends are loaded together,
warmed up with one image, then timed in turns: --repeats rounds per batch size, each backend once
per round, so a change in the machine's load does not favour one of them.

Cells show images/s and, in brackets, images per CPU-second of the process: on a shared machine the
second is the steadier figure (with --threads 1 it is the kernels' own speed). Prints a Markdown
table with native/mtmd; `onnx` is measured when that backend is registered.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llava_local.runtime.llm import LlamaLLM  # noqa: E402
from llava_local.formats.mmproj import read_mmproj  # noqa: E402
from llava_local.vision import BACKENDS, VisionOptions, create_backend  # noqa: E402

BACKEND_ORDER = ("native", "mtmd", "onnx", "torch")
# --native-variants: the CPU choices of native/README.md, each switched off in turn
NATIVE_VARIANTS = {"native-f16-matmul": {"cpu_f32_weights": False},   # F16 weights multiplied as F16
                   "native-softmax-attn": {"flash_attn": False}}      # softmax(QK^T)V instead of fused attention


def build_checkpoint(out_dir: Path) -> Path:
    """LlavaForConditionalGeneration: CLIP ViT-L/14-336 geometry, random weights, a 1-layer Llama of width 4096."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    from train.tiny_models import smollm2_tokenizer_dir

    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
    tcfg = LlamaConfig(hidden_size=4096, intermediate_size=256, num_hidden_layers=1, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_token_index=49151)
    model = LlavaForConditionalGeneration(cfg).eval()
    tmp = out_dir.with_name(out_dir.name + ".part")
    model.save_pretrained(tmp)
    tok = smollm2_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / f).write_bytes((tok / f).read_bytes())
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336).save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def converted(work: Path, outtype: str, *, onnx: bool = False):
    """(LLM GGUF, mmproj GGUF) at `outtype`, converted once; with `onnx`, the ONNX encoder (F32) beside them."""
    import inspect
    from convert import convert, output_paths
    ckpt = build_checkpoint(work / "ckpt")
    dst = work / outtype
    llm, mmproj, manifest = output_paths(dst, ckpt.name, outtype)
    onnx = onnx and "onnx" in inspect.signature(convert).parameters
    have = manifest.is_file() and llm.is_file() and mmproj.is_file()
    if not have or (onnx and "onnx" not in json.loads(manifest.read_text())):
        convert(ckpt, dst, outtype=outtype, **({"onnx": True} if onnx else {}))
    return llm, mmproj


def images(n: int):
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((336, 336, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def time_call(backend, imgs) -> tuple[float, float]:
    """(wall seconds, CPU-seconds of this process) of one encode call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = backend.encode(imgs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert np.isfinite(out).all()
    return wall, cpu


def time_backends(llm_path: Path, mmproj_path: Path, names: list[str], batches: list[int], *, threads: int,
                  repeats: int = 1, vision_device: str = "cpu", label: str = "") -> list[dict]:
    """Images/s of each backend in `names` on one mmproj (the LLM only gives mtmd a model to bind to).
    All backends are loaded together and timed in turns (round r: each backend once), so a change in
    the machine's load lands on all of them rather than on whichever ran at that minute."""
    rows = []
    mmproj = read_mmproj(mmproj_path)
    llm = LlamaLLM(llm_path, n_ctx=1024, n_threads=threads)
    backends = {}
    try:
        for name in names:
            kind = "native" if name in NATIVE_VARIANTS else name
            if kind not in BACKENDS:
                print(f"note: backend {name!r} is not registered here; skipped", file=sys.stderr)
                continue
            options = VisionOptions(device=vision_device, threads=threads, max_batch=max(batches),
                                    **NATIVE_VARIANTS.get(name, {}))
            backends[name] = create_backend(kind, mmproj, options, llm=llm)
            backends[name].encode(images(1))  # warm-up: weights paged in, first graph allocated
        for b in batches:
            imgs = images(b)
            spent = {name: [0.0, 0.0] for name in backends}
            for _ in range(repeats):
                for name, backend in backends.items():
                    wall, cpu = time_call(backend, imgs)
                    spent[name][0] += wall
                    spent[name][1] += cpu
            for name, (wall, cpu) in spent.items():
                n = b * repeats
                rows.append({"outtype": label, "backend": name, "batch": b, "threads": threads,
                             "vision_device": vision_device, "images_per_s": n / wall,
                             "images_per_cpu_s": n / max(cpu, 1e-9), "loadavg": os.getloadavg()[0]})
                print(f"{label} {name:6s} batch {b}: {n / wall:.3f} images/s, {n / max(cpu, 1e-9):.3f} images/CPU-s "
                      f"(load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
    finally:
        for backend in backends.values():
            backend.close()
        llm.close()
    return rows


def run(args) -> list[dict]:
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    names = args.backends.split(",") + (list(NATIVE_VARIANTS) if args.native_variants else [])
    for outtype in args.outtypes.split(","):
        llm_path, mmproj_path = converted(Path(args.work_dir), outtype, onnx="onnx" in names and "onnx" in BACKENDS)
        rows += time_backends(llm_path, mmproj_path, names, batches, threads=args.threads, repeats=args.repeats,
                              vision_device=args.vision_device, label=outtype)
    return rows


def markdown(rows: list[dict], threads: int, device: str = "cpu") -> str:
    """Each cell: images/s (wall clock) and, in brackets, images per CPU-second. The second figure is
    the steadier one on a shared machine: other processes stretch wall time, not our CPU time."""
    cells = {(r["outtype"], r["backend"], r["batch"]): (r["images_per_s"], r["images_per_cpu_s"]) for r in rows}
    load = max((r["loadavg"] for r in rows), default=0.0)
    order = [*BACKEND_ORDER, *(v for v in NATIVE_VARIANTS if any(r["backend"] == v for r in rows))]
    where = "GPU (vision), " if device == "gpu" else ""
    lines = [f"{where}CPU ({os.cpu_count()} cores), {threads} thread(s), CLIP ViT-L/14-336 + mlp2x_gelu, "
             f"random weights; images/s (images per CPU-second); highest load average seen {load:.1f}", "",
             "| weights | batch | " + " | ".join(order) + " | native / mtmd |",
             "|---|---:|" + "---:|" * len(order) + "---:|"]
    for outtype in dict.fromkeys(r["outtype"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows):
            vals = [cells.get((outtype, b, batch)) for b in order]
            n, m = cells.get((outtype, "native", batch)), cells.get((outtype, "mtmd", batch))
            ratio = f"{n[0] / m[0]:.2f}x ({n[1] / m[1]:.2f}x)" if n and m else "n/a"
            lines.append(f"| {outtype.upper()} | {batch} | "
                         + " | ".join(f"{v[0]:.3f} ({v[1]:.3f})" if v else "n/a" for v in vals) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outtypes", default="f16", help="comma-separated: f16, f32, bf16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--backends", default=",".join(BACKEND_ORDER))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=1, help="rounds per batch size (each backend once per round)")
    ap.add_argument("--work-dir", default=str(REPO / ".cache" / "bench-vit-l-336"))
    ap.add_argument("--native-variants", action="store_true",
                    help="also time native with F16 matmuls and with softmax attention (its CPU defaults off)")
    ap.add_argument("--vision-device", default="cpu", choices=("cpu", "gpu"),
                    help="gpu: the GPU of llama.cpp's build (native, mtmd) and CUDA (torch)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = run(args)
    print(markdown(rows, args.threads, args.vision_device))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
