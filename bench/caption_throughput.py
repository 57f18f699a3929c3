"""Images/s of `llava-local caption` (--parallel 1 vs N) against the loop a llama-cpp-python user writes.

    python bench/caption_throughput.py                             # the demo model, 64 images
    python bench/caption_throughput.py --model out/ --images 64 --parallel 1,8 --threads 8 --json caption.json

The plain loop is what llama-cpp-python's documentation shows for LLaVA-1.5:

    llm = Llama(model_path=LLM, chat_handler=Llava15ChatHandler(clip_model_path=MMPROJ), n_ctx=...)
    for image in images:
        llm.create_chat_completion(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}},
            {"type": "text", "text": PROMPT}]}], max_tokens=..., temperature=0)

Every system gets the same JPEG files (synthetic scenes of shapes, 320-800 px, written to
--work-dir), the same prompt, greedy decoding, the same --max-tokens and --threads. Model loading is
excluded everywhere: images/s counts from the model being ready to the last caption. `caption` runs
through the library (caption.job.run_job, its worker process included) with a fresh output each time.
Each system runs --repeats times, interleaved; the table shows the best wall-clock run and the
median CPU seconds per image (worker + job process for `caption`): on a shared machine wall time
is noisy, CPU time much less so.
Tokens per caption are printed too: a real model's captions differ in length between systems (the
vision backends differ: llama-cpp-python uses libmtmd, llava-local by default its exact backend).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llava_local.caption.inputs import discover_inputs  # noqa: E402
from llava_local.caption.job import CaptionJob, run_job  # noqa: E402
from llava_local.caption.worker import WorkerConfig  # noqa: E402
from llava_local.prompts.presets import PROMPTS  # noqa: E402
from llava_local.runtime.model_pair import resolve_pair  # noqa: E402
from llava_local.runtime.model_source import DEMO_DIR  # noqa: E402
from llava_local.runtime.options import EngineOptions  # noqa: E402


def make_images(d: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image, ImageDraw
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w, h = rng.randint(320, 800), rng.randint(320, 800)
        img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 5)):
            x0, y0 = rng.randint(0, w - 40), rng.randint(0, h - 40)
            box = (x0, y0, x0 + rng.randint(30, w // 2), y0 + rng.randint(30, h // 2))
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        p = d / f"scene{i:03d}.jpg"
        img.save(p, quality=90)
        out.append(p)
    return out


def bench_caption(pair, image_dir: Path, work: Path, *, parallel: int, args) -> dict:
    out = work / f"captions-p{parallel}.jsonl"
    out.unlink(missing_ok=True)
    items = discover_inputs([str(image_dir)])
    worker = WorkerConfig(llm_path=str(pair.llm_path), mmproj_path=str(pair.mmproj_path), prompt=args.prompt,
                          max_tokens=args.max_tokens, parallel=parallel, io_threads=args.io_threads,
                          engine=EngineOptions(vision_backend=args.vision_backend, threads=args.threads))
    cpu0 = time.process_time()
    s = run_job(CaptionJob(items, out, worker, pair=pair))
    cpu = s.worker_cpu_s + time.process_time() - cpu0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    toks = [r["n_tokens"] for r in recs if r["status"] == "ok"]
    return {"system": f"llava-local caption --parallel {parallel}", "images": len(recs), "failed": s.failed,
            "load_s": s.load_s, "seconds": s.elapsed_s - s.load_s, "images_per_s": s.images_per_s,
            "cpu_s_per_image": cpu / max(1, len(recs)),
            "tokens_per_caption": sum(toks) / max(1, len(toks)), "vision_backend": s.info.get("vision_backend"),
            "captions": {r["key"]: r["caption"] for r in recs}}


class PlainLoop:
    def __init__(self, pair, args):
        from llama_cpp_python_baseline import use_same_cpu_buffers_as_llava_local
        use_same_cpu_buffers_as_llava_local()
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Llava15ChatHandler
        t0 = time.perf_counter()
        handler = Llava15ChatHandler(clip_model_path=str(pair.mmproj_path), verbose=False)
        n_ctx = pair.image_tokens + 256 + args.max_tokens
        self.llm = Llama(model_path=str(pair.llm_path), chat_handler=handler, n_ctx=n_ctx, n_threads=args.threads,
                         n_threads_batch=args.threads, verbose=False)
        self.load_s = time.perf_counter() - t0
        self.args = args

    def __call__(self, images: list[Path]) -> dict:
        args, toks = self.args, []
        t0, cpu0 = time.perf_counter(), time.process_time()
        for p in images:
            uri = "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()
            out = self.llm.create_chat_completion(messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": args.prompt}]}],
                max_tokens=args.max_tokens, temperature=0.0)
            toks.append(out["usage"]["completion_tokens"])
        seconds = time.perf_counter() - t0
        return {"system": "llama-cpp-python Llava15ChatHandler loop", "images": len(images), "failed": 0,
                "load_s": self.load_s, "seconds": seconds, "images_per_s": len(images) / seconds,
                "cpu_s_per_image": (time.process_time() - cpu0) / len(images),
                "tokens_per_caption": sum(toks) / max(1, len(toks)), "vision_backend": "mtmd (libmtmd)"}


def best(runs: list[dict]) -> dict:
    """The fastest wall-clock run, with the median CPU time per image of all runs."""
    b = dict(max(runs, key=lambda r: r["images_per_s"]))
    b["cpu_s_per_image"] = statistics.median(r["cpu_s_per_image"] for r in runs)
    b["runs_images_per_s"] = [round(r["images_per_s"], 3) for r in runs]
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the demo model, if built)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--parallel", default="1,8", help="comma-separated --parallel values")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for every system (default: all cores)")
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--vision-backend", default="auto")
    ap.add_argument("--prompt", default=PROMPTS["detailed"],
                    help="default: the detailed-caption preset, which the demo model is trained to answer (with "
                         "the short preset, a prompt it never saw, the two systems' answers differ in length)")
    ap.add_argument("--work-dir", default=None, help="where images and outputs go (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per system, interleaved (best wall time shown)")
    ap.add_argument("--skip-plain-loop", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads is None:
        args.threads = os.cpu_count() or 1

    model = args.model or (DEMO_DIR if any(DEMO_DIR.glob("*.gguf")) else None)
    if model is None:
        sys.exit(f"no demo model at {DEMO_DIR} (make demo-model); pass --model DIR")
    pair = resolve_pair(model)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="caption-bench-"))
    images = make_images(work / "images", args.images)
    print(f"model {pair.llm_path.name} + {pair.mmproj_path.name} ({pair.image_tokens} image tokens); "
          f"{args.images} images; max_tokens {args.max_tokens}; threads {args.threads}; work dir {work}",
          file=sys.stderr)

    values = [int(x) for x in args.parallel.split(",")]
    plain = None if args.skip_plain_loop else PlainLoop(pair, args)
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for n in values:
            r = bench_caption(pair, work / "images", work, parallel=n, args=args)
            runs.setdefault(r["system"], []).append(r)
            print(f"  [{rep + 1}/{args.repeats}] {r['system']}: {r['images_per_s']:.2f} images/s", file=sys.stderr)
        if plain is not None:
            r = plain(images)
            runs.setdefault(r["system"], []).append(r)
            print(f"  [{rep + 1}/{args.repeats}] {r['system']}: {r['images_per_s']:.2f} images/s", file=sys.stderr)
    rows = [best(v) for v in runs.values()]
    base = rows[-1] if plain is not None else rows[0]
    base_name = "plain loop" if plain is not None else rows[0]["system"]
    ours = [r for r in rows if "captions" in r]
    same = [sum(r["captions"][k] == ours[0]["captions"][k] for k in r["captions"]) for r in ours[1:]]

    print(f"\n{pair.llm_path.name} + {pair.mmproj_path.name}, {args.images} images, max_tokens {args.max_tokens}, "
          f"threads {args.threads}, greedy, best of {args.repeats}\n")
    print(f"| system | vision | images/s | × {base_name} | CPU s/image | × {base_name} (CPU) | "
          "s (excl. load) | load s | tokens/caption |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['vision_backend']} | {r['images_per_s']:.2f} | "
              f"{r['images_per_s'] / base['images_per_s']:.2f} | {r['cpu_s_per_image']:.3f} | "
              f"{base['cpu_s_per_image'] / r['cpu_s_per_image']:.2f} | {r['seconds']:.1f} | {r['load_s']:.1f} | "
              f"{r['tokens_per_caption']:.1f} |")
    for r, n in zip(ours[1:], same):
        print(f"\ngreedy captions equal to {ours[0]['system']}: {n} of {len(r['captions'])} ({r['system']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model": str(pair.llm_path),
                                               "rows": [{k: v for k, v in r.items() if k != "captions"} for r in rows],
                                               "captions_equal_to_first": same}, indent=2))


if __name__ == "__main__":
    main()
