"""Multi-turn chat over the OpenAI API: `llava-local serve` against llama-cpp-python's server (issue 16).

    python bench/server_multiturn.py                          # 2 threads, 3 repeats, Markdown table
    python bench/server_multiturn.py --threads 2 --repeats 3 --max-tokens 32 --json multiturn.json

One conversation of three requests, as an OpenAI client sends it: the 1st user turn is an image and
a question, the 2nd and 3rd append the previous assistant answer and a new question, and each
request carries the whole history (the image included). Greedy, the same --max-tokens, the same
files, threads and context (4096), through the same client (the official `openai` package):

    ours:   Server(pair, EngineOptions(threads=T), ServeOptions(port=0, parallel=1))   (`llava-local serve`)
    theirs: LCP_PYTHON -m llama_cpp.server --model LLM --clip_model_path MMPROJ --chat_format llava-1-5
                --n_ctx 4096 --n_threads T --n_threads_batch T

The model is bench/startup.py's (built once into --cache-dir, ~1.8 GB): CLIP ViT-L/14-336 (576
image tokens) and a 1-layer Llama of Vicuna-7B's width, random weights. Its answers are noise that
runs to --max-tokens on both sides; the timing does not depend on what they say.

llama-cpp-python's server lives in a venv of its own (its [server] extras bring versions of fastapi and
friends of their own); --lcp-python names that venv's python:

    python3 -m venv .cache/lcp-server-venv
    .cache/lcp-server-venv/bin/pip install "llama-cpp-python[server]==0.3.36"

Both servers are started once and get one untimed warm-up request (another image: lazily loaded
vision contexts, kernels). Each repeat is a new conversation about a new image (the sample photo
shifted by a few pixels, so no side finds it in a cache from an earlier repeat); the order of the
sides alternates. The table gives each request's seconds (median over repeats), the conversation
total and the ratio; ours is also read from GET /metrics around each request: images encoded and
prompt positions evaluated vs reused from the conversation's KV cache; a second table splits each
request into the time before the first token and the decoding of the rest, as each server reports
it (ours: /metrics' decode histogram; theirs: llama.cpp's perf lines in its verbose log, its default).
Goal (issue 16): llama-cpp-python's total >= 3x ours. Decoding the answers is the same work on both
sides, so the ratio approaches 3x only as far as the answers are short next to the image's prefill.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chat_kv_reuse import QUESTIONS  # noqa: E402
from server_throughput import (data_url, read_metrics,  # noqa: E402
                               start_server)
from startup import build_files  # noqa: E402

from llava_local.runtime.model_pair import resolve_pair  # noqa: E402

GOAL = 3.0              # issue 16: the 3 requests >= 3x faster than llama-cpp-python's server
N_CTX = 4096
LCP_PYTHON = REPO / ".cache" / "lcp-server-venv" / "bin" / "python"
OURS, LCP = "llava-local serve", "llama-cpp-python server"
INSTALL = ("python3 -m venv .cache/lcp-server-venv && "
           ".cache/lcp-server-venv/bin/pip install \"llama-cpp-python[server]==0.3.36\"")


def image_variant(photo: Path, k: int) -> Path:
    """The photo shifted k*7 pixels to the right (wrapping): another image to every cache."""
    out = photo.with_name(f"{photo.stem}-shift{k}.png")
    if not out.is_file():
        import numpy as np
        from PIL import Image
        Image.fromarray(np.roll(np.asarray(Image.open(photo).convert("RGB")), 7 * k, axis=1)).save(out)
    return out


# --- llama-cpp-python's server ---
def check_lcp_python(python: Path) -> None:
    if not python.is_file():
        raise SystemExit(f"{python} not found: llama-cpp-python's server goes in a venv of its own:\n    {INSTALL}\n"
                         "(or pass --lcp-python PATH, or --only ours)")
    r = subprocess.run([str(python), "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{python} cannot import llama_cpp.server ({r.stderr.strip().splitlines()[-1:]}); "
                         f"install it:\n    {INSTALL}")


def lcp_cmd(python: Path, llm: Path, mmproj: Path, threads: int, port: int) -> list[str]:
    return [str(python), "-m", "llama_cpp.server", "--model", str(llm), "--clip_model_path", str(mmproj),
            "--chat_format", "llava-1-5", "--n_ctx", str(N_CTX), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--host", "127.0.0.1", "--port", str(port)]


class LcpServer:
    """llama-cpp-python's server as a subprocess; its output goes to `log` (shown when it fails)."""

    def __init__(self, cmd: list[str], log: Path, timeout: float = 600):
        self.cmd, self.log = cmd, log
        self.url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-cpp-python's server exited ({self.proc.returncode}) while loading; "
                                 f"it printed:\n{self.output()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"llama-cpp-python's server did not answer in {timeout:.0f} s; it printed:\n"
                                 f"{self.output()}")
            time.sleep(0.5)

    def output(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what each server says it did, per request ---
class MetricsProbe:
    """Ours: GET /metrics before and after a request (counters and the decode-time histogram's sum)."""
    KEYS = {"image_encodes": "llava_local_image_encodes_total", "decode_s": "llava_local_decode_seconds_sum",
            "prompt_tokens_evaluated": "llava_local_prompt_tokens_evaluated_total",
            "prompt_tokens_cached": "llava_local_prompt_tokens_cached_total"}

    def __init__(self, url: str):
        self.url, self.m0 = url, {}

    def before(self) -> None:
        self.m0 = read_metrics(self.url)

    def after(self) -> dict:
        m1 = read_metrics(self.url)
        return {k: m1.get(name, 0) - self.m0.get(name, 0) for k, name in self.KEYS.items()}


class LogProbe:
    """llama-cpp-python: what its verbose log (its default) printed during a request: mtmd's image
    encodes and llama.cpp's perf line for the generated tokens ("eval time = X ms / N runs")."""

    def __init__(self, log: Path):
        self.log, self.offset = log, 0

    def before(self) -> None:
        self.offset = self.log.stat().st_size

    def after(self) -> dict:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        encodes = [float(ms) for ms in re.findall(r"image slice encoded in (\d+) ms", text)]
        decode = [float(ms) for ms in re.findall(r"^\S*\s+eval time =\s*([\d.]+) ms", text, re.M)]
        return {"image_encodes": len(encodes), "image_encode_s": sum(encodes) / 1000, "decode_s": sum(decode) / 1000}


# --- the conversation ---
def user_turn(text: str, image_url: str | None = None) -> dict:
    """A user message: the image first (as LLaVA puts it), then the question."""
    parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def conversation(url: str, image: Path, turns: int, max_tokens: int, probe=None) -> list[dict]:
    """`turns` requests, each with the whole history; per request: seconds, usage, answer, the probe's figures."""
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    model = client.models.list().data[0].id
    messages, out = [], []
    for i in range(turns):
        messages.append(user_turn(QUESTIONS[i % len(QUESTIONS)], data_url(image) if i == 0 else None))
        if probe:
            probe.before()
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        seconds = time.perf_counter() - t0
        answer = r.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": answer})
        details = getattr(r.usage, "prompt_tokens_details", None)
        out.append({"seconds": seconds, "prompt_tokens": r.usage.prompt_tokens,
                    "completion_tokens": r.usage.completion_tokens, "finish_reason": r.choices[0].finish_reason,
                    "cached_tokens": getattr(details, "cached_tokens", None), "answer": answer,
                    **(probe.after() if probe else {})})
    return out


def print_breakdown(runs: dict[str, list[list[dict]]], args) -> None:
    """Where each request's time went, as each server reports it (medians over repeats): generating
    the answer (ours: /metrics' decode histogram; theirs: llama.cpp's perf line in its log) and the
    rest (HTTP, image decode + encode, prompt evaluation, the first token)."""
    print(f"\nwhere the time went (median of {args.repeats}): before the first token / decoding the rest (s), "
          "ms per decoded token, images encoded (theirs: mtmd's encode s)\n")
    print("| server | " + " | ".join(f"request {i + 1}" for i in range(args.turns)) + " |")
    print("|---|" + "---|" * args.turns)
    for name, convs in runs.items():
        cells = []
        for i in range(args.turns):
            rs = [c[i] for c in convs]
            dec = statistics.median(r["decode_s"] for r in rs)
            first = statistics.median(r["seconds"] - r["decode_s"] for r in rs)
            per_tok = statistics.median(1000 * r["decode_s"] / max(1, r["completion_tokens"] - 1) for r in rs)
            enc = f"{statistics.median(r['image_encodes'] for r in rs):.0f}"
            if "image_encode_s" in rs[0]:
                enc += f" ({statistics.median(r['image_encode_s'] for r in rs):.1f} s)"
            cells.append(f"{first:.2f} / {dec:.2f}, {per_tok:.0f} ms/tok, {enc} img")
        print(f"| {name} | " + " | ".join(cells) + " |")


def print_report(runs: dict[str, list[list[dict]]], args, info: dict) -> dict:
    print(f"\n{args.turns} requests (one conversation, whole history each time), max_tokens {args.max_tokens}, "
          f"greedy, threads {args.threads}, n_ctx {N_CTX}; median of {args.repeats} conversations; "
          f"ours: vision {info.get('vision_backend')}, --parallel {args.parallel}\n")
    heads = " | ".join(f"request {i + 1} (s)" for i in range(args.turns))
    print(f"| server | {heads} | total (s) | totals of each repeat (s) | prompt / completion tokens per request |")
    print("|---|" + "---:|" * args.turns + "---:|---|---|")
    totals = {}
    for name, convs in runs.items():
        per = [statistics.median(c[i]["seconds"] for c in convs) for i in range(args.turns)]
        each = [sum(r["seconds"] for r in c) for c in convs]
        totals[name] = statistics.median(each)
        toks = ", ".join(f"{r['prompt_tokens']}/{r['completion_tokens']}" for r in convs[-1])
        print(f"| {name} | " + " | ".join(f"{s:.2f}" for s in per) +
              f" | {totals[name]:.2f} | {', '.join(f'{t:.2f}' for t in each)} | {toks} |")
    summary = {"totals_s": totals}
    if len(totals) == 2:
        ratio = totals[LCP] / totals[OURS]
        paired = statistics.median(sum(r["seconds"] for r in b) / sum(r["seconds"] for r in a)
                                   for a, b in zip(runs[OURS], runs[LCP]))
        print(f"\nllama-cpp-python / ours: {ratio:.2f}x (median totals), median of paired ratios {paired:.2f}x; "
              f"goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'}")
        summary.update(ratio=ratio, paired_ratio=paired)
    print_breakdown(runs, args)
    if OURS in runs:
        print("\nours, GET /metrics around each request of the last conversation (new = prompt positions not in the "
              "previous request's prompt + answer):\n")
        print("| request | images encoded | prompt evaluated | prompt cached (usage.cached_tokens) | new | "
              "finish_reason |")
        print("|---:|---:|---:|---:|---:|---|")
        prev, extra = 0, []
        for i, r in enumerate(runs[OURS][-1]):
            new = r["prompt_tokens"] - prev
            print(f"| {i + 1} | {r['image_encodes']:.0f} | {r['prompt_tokens_evaluated']:.0f} | "
                  f"{r['prompt_tokens_cached']:.0f} ({r['cached_tokens']}) | {new} | {r['finish_reason']} |")
            if i and r["prompt_tokens_evaluated"] > new:
                extra.append(f"request {i + 1}: {r['prompt_tokens_evaluated'] - new:.0f}")
            prev = r["prompt_tokens"] + r["completion_tokens"]
        if extra:
            print(f"\nevaluated beyond the new positions ({'; '.join(extra)}): the previous answer's positions, "
                  "evaluated again")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both servers")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--turns", type=int, default=3, help="requests in the conversation")
    ap.add_argument("--repeats", type=int, default=3, help="conversations per server, order alternating (median)")
    ap.add_argument("--parallel", type=int, default=1, help="our server's --parallel")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench-startup",
                    help="where bench/startup.py builds (or has built) the model files")
    ap.add_argument("--lcp-python", type=Path, default=LCP_PYTHON,
                    help="python of the venv with llama-cpp-python[server] (see above)")
    ap.add_argument("--only", choices=["ours", "lcp"], default=None, help="time one server only")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.only != "ours":
        check_lcp_python(args.lcp_python)

    llm, mmproj, photo = build_files(args.cache_dir)
    warm_image = image_variant(photo, 100)
    images = [image_variant(photo, k) for k in range(args.repeats)]
    servers: dict[str, str] = {}
    ours = lcp = None
    info: dict = {}
    failures: dict[str, str] = {}
    try:
        if args.only != "lcp":
            ours = start_server(resolve_pair(llm, mmproj), parallel=args.parallel, threads=args.threads)
            servers[OURS] = ours.url
            info = ours.engine.info
        if args.only != "ours":
            cmd = lcp_cmd(args.lcp_python, llm, mmproj, args.threads, free_port())
            print(f"{LCP}: {shlex.join(cmd)}", file=sys.stderr)
            lcp = LcpServer(cmd, args.cache_dir / "lcp-server.log")
            servers[LCP] = lcp.url
        for name, url in list(servers.items()):   # untimed: another image, one token
            try:
                conversation(url, warm_image, 1, 1)
            except Exception as exc:
                if name != LCP:
                    raise
                # a finding, not a crash of the bench: llama-cpp-python cannot run this model; say what it printed
                print(f"\n{LCP} failed its first image request: {type(exc).__name__}: {exc}\n"
                      f"its output ({lcp.log}), last part:\n{lcp.output()}\n")
                failures[LCP] = f"{type(exc).__name__}: {exc}"
                del servers[LCP]
        runs: dict[str, list[list[dict]]] = {name: [] for name in servers}
        probes = {OURS: MetricsProbe(servers.get(OURS, "")), LCP: LogProbe(lcp.log) if lcp else None}
        for rep, image in enumerate(images):
            for name in (list(servers) if rep % 2 == 0 else list(servers)[::-1]):
                try:
                    conv = conversation(servers[name], image, args.turns, args.max_tokens, probes[name])
                except Exception as exc:
                    log = f"\n{LCP} printed:\n{lcp.output()}" if name == LCP else ""
                    raise SystemExit(f"{name} failed: {type(exc).__name__}: {exc}{log}") from exc
                runs[name].append(conv)
                print(f"  [{rep + 1}/{args.repeats}] {name}: " + " + ".join(f"{r['seconds']:.2f}" for r in conv) +
                      f" = {sum(r['seconds'] for r in conv):.2f} s", file=sys.stderr)
    finally:
        if ours is not None:
            ours.close()
        if lcp is not None:
            lcp.close()
    summary = print_report(runs, args, info)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "llm": str(llm),
                                         "mmproj": str(mmproj), "ours_info": info, "summary": summary,
                                         "failures": failures, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
