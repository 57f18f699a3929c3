"""One-shot start-up: `llava-local chat -p` against upstream `llama-mtmd-cli`, whole processes.

    python bench/startup.py                                 # 2 threads, 5 runs each, Markdown table
    python bench/startup.py --threads 2 --runs 5 --json out.json
    python bench/startup.py --ours-args "--vision-backend torch"     # what another backend costs

What a user who asks one question about one picture waits for, and how much memory it takes: each
run is a fresh process (interpreter start, imports, model load, image encode, prefill, 32 tokens,
exit). Both tools get the same files, image, question, system prompt (LLaVA-1.5's, which our
template adds and mtmd-cli gets as -sys), threads, context (the LLM's 4096) and greedy decoding:

    llava-local chat --model LLM --mmproj MMPROJ --threads T --max-tokens 32 -p Q IMAGE   (default options)
    llama-mtmd-cli -m LLM --mmproj MMPROJ --image IMAGE -sys SYSTEM -p Q -n 32 --temp 0 -t T

The files (built once into --cache-dir, ~1.8 GB): an mmproj F16 of LLaVA-1.5's vision cost (CLIP
ViT-L/14-336, the 23 layers LLaVA's feature layer -2 runs, width 1024, 16 heads, MLP 4096;
projector 1024 -> 4096 -> 4096) and a 1-layer F16 Llama of Vicuna-7B's width (4096, MLP 11008,
32 heads) with SmolLM2's 49152-token vocabulary, random weights (std 0.02), written by
train/random_gguf.py with convert/'s own writers. llama-mtmd-cli comes from `make upstream-tools`.

After one untimed warm-up run each (page cache; our .pyc files, see byte_compiled_env), runs
alternate between the tools so a change in the machine's load hits both. Wall time is
perf_counter from spawn to reap; peak memory is the child's ru_maxrss from os.wait4 (one child at a
time; file pages of the mmapped LLM count, as they do for both); CPU time is its user + system time,
the steadier figure on a shared machine. Untimed check runs then count prompt positions and tokens
generated on both sides (ours with --json, mtmd with -v). Goal (issue 14): ours <= 1.2x upstream's
wall time and peak memory on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MTMD_CLI = REPO / ".cache" / "llama.cpp-upstream" / "build" / "bin" / "llama-mtmd-cli"
PROMPT = "What is in this picture? Answer in one sentence."
GOAL = 1.2           # issue 14: ours within 1.2x upstream's wall time and peak memory


def build_files(cache_dir: Path) -> tuple[Path, Path, Path]:
    """(LLM, mmproj, image), built once: the 7B-wide 1-layer LLM and the ViT-L/14-336 mmproj, F16."""
    from train.random_gguf import ClipSpec, LlmSpec, PairSpec, build_pair
    spec = PairSpec("startup-7b-wide-1layer", LlmSpec(n_layer=1), ClipSpec())
    files = build_pair(cache_dir, spec, outtypes=("f16",))
    image = cache_dir / "photo.png"
    if not image.is_file():   # a 640x480 picture with structure (a gradient under noise), not one colour
        import numpy as np
        from PIL import Image
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:480, 0:640]
        rgb = np.stack([x * 255 / 639, y * 255 / 479, (x + y) * 255 / 1118], axis=-1)
        rgb = np.clip(rgb + rng.normal(0, 24, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(image)
    return files.llm["F16"], files.mmproj["F16"], image


def ours_cmd(prefix: list[str], llm: Path, mmproj: Path, image: Path, threads: int, n: int,
             extra: list[str]) -> list[str]:
    if not prefix:
        exe = Path(sys.executable).with_name("llava-local")
        prefix = [str(exe)] if exe.is_file() else [sys.executable, "-m", "llava_local.cli.main"]
    return prefix + ["chat", "--model", str(llm), "--mmproj", str(mmproj), "--threads", str(threads),
                     "--max-tokens", str(n), *extra, "-p", PROMPT, str(image)]


def mtmd_cmd(cli: Path, llm: Path, mmproj: Path, image: Path, threads: int, n: int) -> list[str]:
    """With our template's system prompt: llama.cpp detects the GGUF's template as its built-in Vicuna
    one, which adds no system prompt by itself, so without -sys it would prefill ~30 tokens fewer."""
    from llava_local.prompts.templates import VICUNA_SYSTEM
    return [str(cli), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(image), "-sys", VICUNA_SYSTEM,
            "-p", PROMPT, "-n", str(n), "--temp", "0", "-t", str(threads)]


def byte_compiled_env(cache_dir: Path) -> dict[str, str]:
    """Our side runs byte-compiled, as a pip install leaves it (pip compiles at install; an editable
    install writes __pycache__ on first import). With PYTHONDONTWRITEBYTECODE set (this project's
    sandboxes set it) every run would compile ~40 of our modules again: ~0.1 s that no user pays.
    The .pyc files go to a prefix under the cache dir, not into the source tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache_dir / "pycache")
    return env


def run_once(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Spawn, wait with os.wait4: wall seconds, peak RSS (bytes), CPU seconds, exit code, output.
    Output goes to temporary files: Popen.communicate would reap the child before wait4 could."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errtext = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{errtext[-3000:]}")
    scale = 1 if sys.platform == "darwin" else 1024       # ru_maxrss: bytes on macOS, KiB on Linux
    return {"wall_s": wall, "peak_rss": ru.ru_maxrss * scale, "cpu_s": ru.ru_utime + ru.ru_stime,
            "stdout": text, "stderr": errtext}


_QUIET = None   # a llama.cpp log callback that drops everything (kept alive while llama.cpp may call it)


def count_tokens(llm: Path, text: str) -> int:
    """Tokens in an answer, re-tokenized with the LLM's vocabulary."""
    from llama_cpp import llama_cpp as L
    global _QUIET
    _QUIET = _QUIET or L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(_QUIET, None)
    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(llm).encode(), params)
    try:
        data = text.strip("\n").encode()
        buf = (L.llama_token * (len(data) + 8))()
        return int(L.llama_tokenize(L.llama_model_get_vocab(model), data, len(data), buf, len(buf), False, False))
    finally:
        L.llama_model_free(model)


def check_work(ours: list[str] | None, mtmd: list[str] | None, llm: Path, env: dict[str, str],
               max_tokens: int) -> dict:
    """Untimed runs that show both sides did the same work: prompt positions and tokens generated.
    Ours: `--json`. mtmd: `-v` prints its perf counters (prompt positions; its decode count misses
    the last, unsynchronized token, so the answer is re-tokenized instead; it stops early only at
    an end-of-generation token, which it does not print)."""
    work = {}
    if ours:
        i = ours.index("-p")
        rec = json.loads(run_once(ours[:i] + ["--json"] + ours[i:], env)["stdout"].strip().splitlines()[-1])
        work["ours"] = {"prompt": rec["n_prompt_tokens"], "generated": rec["n_tokens"], "stop": rec["finish_reason"],
                        "timings": rec["timings"]}
    if mtmd:
        r = run_once(mtmd + ["-v"])
        prompt = sum(int(n) for n in re.findall(r"prompt eval time =.*?/\s*(\d+) tokens", r["stderr"]))
        n = count_tokens(llm, r["stdout"])
        work["mtmd"] = {"prompt": prompt or None, "generated": n,
                        "stop": "length" if n >= max_tokens else "end of generation?"}
    return work


def summarize(runs: list[dict]) -> dict:
    return {"wall_s": statistics.median(r["wall_s"] for r in runs), "wall_min_s": min(r["wall_s"] for r in runs),
            "peak_rss": statistics.median(r["peak_rss"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "walls": [round(r["wall_s"], 2) for r in runs], "cpus": [round(r["cpu_s"], 2) for r in runs],
            "peaks_mib": [round(r["peak_rss"] / 2**20) for r in runs]}


OURS, MTMD = "llava-local chat -p", "llama-mtmd-cli"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="whole-process runs per tool (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per tool first (page cache, .pyc files)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench-startup")
    ap.add_argument("--mtmd-cli", type=Path, default=MTMD_CLI, help="upstream llama-mtmd-cli (make upstream-tools)")
    ap.add_argument("--ours-args", default="", help="extra options for llava-local chat, e.g. '--vision-backend torch'")
    ap.add_argument("--ours-cmd", default="", help="command that runs llava-local (default: this venv's llava-local)")
    ap.add_argument("--only", choices=["ours", "mtmd"], default=None, help="time one side only")
    ap.add_argument("--no-check", action="store_true", help="skip the untimed runs that count prompt and answer tokens")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    llm, mmproj, image = build_files(args.cache_dir)
    sides = {}
    if args.only != "mtmd":
        sides[OURS] = ours_cmd(shlex.split(args.ours_cmd), llm, mmproj, image, args.threads, args.max_tokens,
                               shlex.split(args.ours_args))
    if args.only != "ours":
        if not args.mtmd_cli.is_file():
            raise SystemExit(f"{args.mtmd_cli} missing: run `make upstream-tools` (or pass --only ours)")
        sides[MTMD] = mtmd_cmd(args.mtmd_cli, llm, mmproj, image, args.threads, args.max_tokens)
    for name, cmd in sides.items():
        print(f"{name}: {shlex.join(cmd)}", file=sys.stderr)

    envs = {OURS: byte_compiled_env(args.cache_dir), MTMD: None}
    for _ in range(args.warmup):
        for name, cmd in sides.items():
            run_once(cmd, envs[name])
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    loads = []
    for i in range(args.runs):             # alternate: a change in the machine's load hits both sides
        for name, cmd in sides.items():
            r = run_once(cmd, envs[name])
            runs[name].append(r)
            loads.append(os.getloadavg()[0])
            print(f"run {i + 1} {name}: {r['wall_s']:.2f} s, {r['peak_rss'] / 2**20:.0f} MiB, cpu {r['cpu_s']:.2f} s, "
                  f"load {loads[-1]:.1f}", file=sys.stderr)
    work = {} if args.no_check else check_work(sides.get(OURS), sides.get(MTMD), llm, envs[OURS], args.max_tokens)

    stats = {name: summarize(rs) for name, rs in runs.items()}
    print(f"\n{args.runs} runs each, {args.threads} threads, {args.max_tokens} tokens; 1-min load average during the "
          f"runs {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs\n")
    print("| tool | wall median (s) | wall min (s) | peak RSS median (MiB) | CPU median (s) | prompt / generated tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for name, s in stats.items():
        w = work.get("ours" if name == OURS else "mtmd")
        tok = f"{w['prompt']} / {w['generated']} ({w['stop']})" if w else "-"
        print(f"| {name} | {s['wall_s']:.2f} | {s['wall_min_s']:.2f} | {s['peak_rss'] / 2**20:.0f} | "
              f"{s['cpu_s']:.2f} | {tok} |")
    if len(stats) == 2:
        a, b = stats[OURS], stats[MTMD]
        ratios = {k: a[k] / b[k] for k in ("wall_s", "wall_min_s", "peak_rss", "cpu_s")}
        # each run of ours against the mtmd run right after it: the same load, roughly
        ratios["wall_paired"] = statistics.median(x["wall_s"] / y["wall_s"] for x, y in zip(runs[OURS], runs[MTMD]))
        ok = ratios["wall_s"] <= GOAL and ratios["peak_rss"] <= GOAL
        print(f"| ours / upstream | {ratios['wall_s']:.2f}x | {ratios['wall_min_s']:.2f}x | {ratios['peak_rss']:.2f}x | "
              f"{ratios['cpu_s']:.2f}x | median of paired wall ratios {ratios['wall_paired']:.2f}x |")
        print(f"\nGoal (<= {GOAL}x upstream's wall median and peak memory): {'met' if ok else 'NOT met'}")
        stats["ratios"] = ratios
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "max_tokens": args.max_tokens,
                                         "load_average_during_runs": loads, "commands": sides, "stats": stats,
                                         "work": work}, indent=2))


if __name__ == "__main__":
    main()
