"""Images/s of `llava-local caption --ray local` (N actors, one engine each) against single-machine
`caption` on the same images, both run as a user runs them: the CLI in a fresh process.

    python bench/caption_ray.py                                   # the demo model, 200 images, 2 actors
    python bench/caption_ray.py --images 200 --actors 2 --threads 2 --single-threads 1,2 --json ray.json

Every run gets the same JPEGs (bench/caption_throughput.py's synthetic scenes, 320-800 px), prompt,
greedy decoding and --max-tokens. `--ray local` starts a one-machine Ray cluster whose --actors get
--threads / --actors threads each; single-machine `caption` runs one engine with each of
--single-threads (default: one actor's share, and all --threads). Two figures per run: images/s as
the command's summary prints it (from the first engine ready to the last caption: model load and,
for Ray, cluster start excluded) and the end-to-end wall clock of the command. The captions are
compared key by key with the first single-machine run's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from caption_throughput import make_images  # noqa: E402

RATE = re.compile(r"([\d.]+) images/s \(")


def run_caption(args: list[str], cwd: Path) -> dict:
    cmd = [sys.executable, "-m", "llava_local.cli.main", "caption", *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    m = RATE.search(res.stderr)
    return {"images_per_s": float(m.group(1)) if m else None, "wall_s": round(wall, 2),
            "summary": [ln for ln in res.stderr.splitlines() if "images/s" in ln][-1]}


def captions(path: Path) -> dict[str, str]:
    files = sorted(path.glob("part-*.jsonl")) if path.is_dir() else [path]
    return {r["key"]: r["caption"] for f in files for r in map(json.loads, f.read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the demo model")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="in all, shared by the actors")
    ap.add_argument("--single-threads", default=None, help="comma-separated; default: threads/actors,threads")
    ap.add_argument("--parallel", type=int, default=1, help="images decoded together, per engine")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vision-backend", default="auto")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="caption-ray-"))
    make_images(work / "imgs", a.images)
    common = ["imgs", "--parallel", str(a.parallel), "--max-tokens", str(a.max_tokens), "--vision-backend",
              a.vision_backend, "--overwrite", *(["--model", a.model] if a.model else [])]
    per_actor = max(1, a.threads // a.actors)
    single_threads = ([int(t) for t in a.single_threads.split(",")] if a.single_threads
                      else sorted({per_actor, a.threads}))
    runs = {}
    for t in single_threads:
        runs[f"caption (1 engine x {t} threads)"] = run_caption([*common, "-o", f"single{t}.jsonl", "--threads",
                                                                 str(t)], work)
    runs[f"caption --ray local ({a.actors} actors x {per_actor} threads)"] = run_caption(
        [*common, "-o", "ray.jsonl", "--threads", str(per_actor), "--ray", "local", "--ray-actors", str(a.actors),
         "--block-size", str(a.block_size)], work)
    ref, mine = captions(work / f"single{single_threads[0]}.jsonl"), captions(work / "ray.jsonl")
    same = sum(ref[k] == mine.get(k) for k in ref)
    result = {"images": a.images, "threads": a.threads, "actors": a.actors, "parallel": a.parallel,
              "max_tokens": a.max_tokens, "runs": runs, "records": [len(ref), len(mine)], "same_captions": same}
    print(f"{a.images} images, parallel {a.parallel} per engine, --max-tokens {a.max_tokens}")
    for name, r in runs.items():
        print(f"  {name:<44} {r['images_per_s']:7.2f} images/s, {r['wall_s']:6.1f} s end to end")
    print(f"  identical captions (Ray vs 1 engine x {single_threads[0]} threads): {same} of {len(ref)} "
          f"(records: {len(ref)} vs {len(mine)})")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
