"""Throughput of `llava-local serve` under concurrent clients: --parallel 8 against --parallel 1.

    python bench/server_throughput.py                                   # the demo model, 16 clients x 4
    python bench/server_throughput.py --threads 1 --repeats 3 --json server_throughput.json
    python bench/server_throughput.py --model LLM.gguf --mmproj MMPROJ.gguf --parallel 1,4,8 --max-tokens 64

The load (issue 16): --clients concurrent clients of the official `openai` package (AsyncOpenAI, in
a process of their own, as real clients are), each sending --requests one after another; request j
of client c asks about image (c + j) mod 4 of llava_local/data/samples/shapes-{1..4}.png (a data:
URL), the same question (--prompt), greedy, the same --max-tokens; the even-numbered clients stream
(stream_options.include_usage), the others do not. Every --parallel value gets a fresh server
(Server(pair, EngineOptions(threads=T), ServeOptions(port=0, parallel=N)): uvicorn in this process,
the engine in its own), one untimed text-only warm-up request, then the load. The order of the
values alternates from one repeat to the next, so a change in the machine's load hits each of them.

Reported per --parallel value (the run with the median requests/s of --repeats; each run's
requests/s listed too): requests/s and completion tokens/s from the first request sent to the last
answer; p50/p95 latency of whole requests; p50/p95 time to first token of the streamed half (first
non-empty content delta); requests answered completely (a finish_reason, no error); answers equal
to the single-request greedy answer of their image (one request at a time to a --parallel 1
server, before the measured runs). Then the work: CPU seconds of the engine process, of the HTTP
process and of the clients (medians; steadier than wall time on a shared machine), and from GET
/metrics the images encoded and prompt positions evaluated vs reused from a KV cache. Identical
requests reuse a cached prefix (the image's embeddings, the prompt's KV cells) and --parallel N
keeps N such prefixes, so these columns say how much of a difference is batching and how much reuse.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLES = REPO / "llava_local" / "data" / "samples"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_message(text: str, url: str) -> dict:
    """A user message: the text, then the image as an image_url part."""
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}

from llava_local.prompts.presets import PROMPTS  # noqa: E402
from llava_local.runtime.model_pair import resolve_pair  # noqa: E402
from llava_local.runtime.model_source import DEMO_DIR  # noqa: E402
from llava_local.runtime.options import EngineOptions  # noqa: E402
from llava_local.server.launch import ServeOptions, Server  # noqa: E402

IMAGES = [SAMPLES / f"shapes-{i}.png" for i in range(1, 5)]
COUNTERS = ("llava_local_image_encodes_total", "llava_local_prompt_tokens_evaluated_total",
            "llava_local_prompt_tokens_cached_total", "llava_local_completion_tokens_total")


# --- helpers server_multiturn.py shares ---
def start_server(pair, *, parallel: int, threads: int | None, max_queue: int = 64) -> Server:
    """A fresh server on a free port with its model loaded (close() it)."""
    srv = Server(pair, EngineOptions(threads=threads), ServeOptions(port=0, parallel=parallel, max_queue=max_queue))
    srv.start_in_thread()
    try:
        srv.wait_ready(600)
    except BaseException:
        srv.close()
        raise
    return srv


def read_metrics(url: str) -> dict[str, float]:
    """The unlabelled counters of GET /metrics (Prometheus text): {name: value}."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {name: float(value) for name, value in
            (line.split()[:2] for line in text.splitlines() if line and not line.startswith("#") and "{" not in line)}


def engine_cpu_s(srv: Server) -> float:
    """User + system CPU seconds of the server's engine process so far."""
    import psutil
    t = psutil.Process(srv.engine.pid).cpu_times()
    return t.user + t.system


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


# --- one request ---
async def ask(client, messages: list[dict], *, stream: bool, max_tokens: int) -> dict:
    """One chat completion, greedy: text, completion tokens, finish reason, latency, TTFT (streams)."""
    t0 = time.perf_counter()
    rec = {"stream": stream, "ttft_s": None, "error": None, "finish_reason": None, "text": "", "tokens": 0}
    try:
        if stream:
            parts = []
            resp = await client.chat.completions.create(model="", messages=messages, temperature=0,
                                                        max_tokens=max_tokens, stream=True,
                                                        stream_options={"include_usage": True})
            async for chunk in resp:
                if chunk.usage is not None:
                    rec["tokens"] = chunk.usage.completion_tokens
                for ch in chunk.choices:
                    if ch.delta.content:
                        rec["ttft_s"] = rec["ttft_s"] or time.perf_counter() - t0
                        parts.append(ch.delta.content)
                    rec["finish_reason"] = ch.finish_reason or rec["finish_reason"]
            rec["text"] = "".join(parts)
        else:
            r = await client.chat.completions.create(model="", messages=messages, temperature=0,
                                                     max_tokens=max_tokens)
            rec.update(text=r.choices[0].message.content or "", finish_reason=r.choices[0].finish_reason,
                       tokens=r.usage.completion_tokens)
    except Exception as exc:    # an answer that did not come is a result of the bench, not its end
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["latency_s"] = time.perf_counter() - t0
    return rec


def import_openai() -> None:
    importlib.import_module("openai")


def openai_client(url: str):
    from openai import AsyncOpenAI

    # no retries: a refused or failed request must show in the results, not be hidden by a second try
    return AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)


async def single_answers(url: str, urls: list[str], prompt: str, max_tokens: int) -> list[str]:
    async with openai_client(url) as client:
        out = []
        for u in urls:
            r = await ask(client, [image_message(prompt, u)], stream=False, max_tokens=max_tokens)
            if r["error"]:
                raise SystemExit(f"the single-request reference failed: {r['error']}")
            out.append(r["text"])
        return out


async def load(url: str, urls: list[str], args) -> tuple[list[dict], float]:
    """--clients clients, --requests each; (one record per request, wall seconds)."""
    async with openai_client(url) as client:
        async def one_client(c: int) -> list[dict]:
            recs = []
            for j in range(args.requests):
                image = (c + j) % len(urls)
                r = await ask(client, [image_message(args.prompt, urls[image])], stream=c % 2 == 0,
                              max_tokens=args.max_tokens)
                recs.append({**r, "client": c, "image": image})
            return recs

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(c) for c in range(args.clients)))
        return [r for rs in per_client for r in rs], time.perf_counter() - t0


def client_process_load(url: str, urls: list[str], args) -> tuple[list[dict], float, float]:
    """`load` in the clients' own process (as real clients are: not sharing the server's GIL);
    (records, wall seconds, the clients' CPU seconds)."""
    cpu0 = time.process_time()
    recs, wall = asyncio.run(load(url, urls, args))
    return recs, wall, time.process_time() - cpu0


# --- one run ---
def run_once(pair, parallel: int, urls: list[str], reference: list[str], args, clients) -> dict:
    """A fresh server, a warm-up, the load sent from the `clients` process pool; the figures."""
    srv = start_server(pair, parallel=parallel, threads=args.threads, max_queue=max(64, args.clients))
    try:
        asyncio.run(_warm_up(srv.url))
        m0, cpu0, http0 = read_metrics(srv.url), engine_cpu_s(srv), time.process_time()
        recs, wall, client_cpu = clients.apply(client_process_load, (srv.url, urls, args))
        m1, cpu1, http1 = read_metrics(srv.url), engine_cpu_s(srv), time.process_time()
    finally:
        srv.close()
    ok = [r for r in recs if r["error"] is None and r["finish_reason"] is not None]
    lat = [r["latency_s"] for r in recs]
    ttft = [r["ttft_s"] for r in recs if r["stream"] and r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    metrics = {k.removeprefix("llava_local_").removesuffix("_total"): m1.get(k, 0) - m0.get(k, 0) for k in COUNTERS}
    return {"parallel": parallel, "requests": len(recs), "complete": len(ok), "seconds": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
            "completion_tokens_per_request": tokens / max(1, len(ok)),
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "equal_to_single": sum(r["text"] == reference[r["image"]] for r in ok),
            "engine_cpu_s": cpu1 - cpu0, "http_cpu_s": http1 - http0, "client_cpu_s": client_cpu,
            "metrics": metrics, "errors": sorted({r["error"] for r in recs if r["error"]}),
            "finish_reasons": sorted({str(r["finish_reason"]) for r in ok})}


async def _warm_up(url: str) -> None:
    """One untimed text-only request: lazily initialised kernels, the HTTP stack; no image is cached."""
    async with openai_client(url) as client:
        r = await ask(client, [{"role": "user", "content": "Hello."}], stream=False, max_tokens=2)
    if r["error"]:
        raise SystemExit(f"the warm-up request failed: {r['error']}")


def median_run(runs: list[dict]) -> dict:
    """The run with the median requests/s, every run's requests/s listed, and median CPU seconds (on a
    shared machine wall time is noisy, CPU time much less so)."""
    ordered = sorted(runs, key=lambda r: r["requests_per_s"])
    m = dict(ordered[(len(ordered) - 1) // 2])
    m["runs_requests_per_s"] = [round(r["requests_per_s"], 2) for r in runs]
    for k in ("engine_cpu_s", "http_cpu_s", "client_cpu_s"):
        m[k] = statistics.median(r[k] for r in runs)
        m["runs_" + k] = [round(r[k], 2) for r in runs]
    return m


def print_table(rows: list[dict], args, n_requests: int) -> None:
    base = rows[0]
    print(f"\n{args.clients} clients x {args.requests} requests ({n_requests}, half streamed), 4 images, "
          f"max_tokens {args.max_tokens}, greedy, threads {args.threads}; the median run of {args.repeats}\n")
    print(f"| --parallel | requests/s | × --parallel {base['parallel']} | completion tok/s | latency p50 / p95 (s) | "
          "TTFT p50 / p95 (s, streamed) | complete | = single-request answer | requests/s of each run |")
    print("|---:|---:|---:|---:|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['parallel']} | {r['requests_per_s']:.2f} | {r['requests_per_s'] / base['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} | "
              f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | {r['complete']}/{r['requests']} | "
              f"{r['equal_to_single']}/{r['complete']} | {r['runs_requests_per_s']} |")
    print("\nWork and CPU (median of runs): engine = the engine process, HTTP = uvicorn's process, clients = theirs\n")
    print("| --parallel | tokens/answer | engine CPU (s) | engine CPU ms/token | HTTP CPU (s) | clients CPU (s) | "
          "images encoded | prompt positions evaluated / cached |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        m = r["metrics"]
        print(f"| {r['parallel']} | {r['completion_tokens_per_request']:.1f} | {r['engine_cpu_s']:.2f} | "
              f"{1000 * r['engine_cpu_s'] / max(1, m['completion_tokens']):.2f} | {r['http_cpu_s']:.2f} | "
              f"{r['client_cpu_s']:.2f} | {m['image_encodes']:.0f} | "
              f"{m['prompt_tokens_evaluated']:.0f} / {m['prompt_tokens_cached']:.0f} |")
    for r in rows:
        if r["errors"]:
            print(f"\n--parallel {r['parallel']} errors: {r['errors']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or LLM .gguf (default: the demo model)")
    ap.add_argument("--mmproj", default=None, help="with an LLM .gguf as --model")
    ap.add_argument("--parallel", default="1,8", help="comma-separated --parallel values, each a fresh server")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the engine (default: all cores)")
    ap.add_argument("--prompt", default=PROMPTS["detailed"], help="the question (default: the detailed-caption "
                    "preset, which the demo model is trained to answer)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per --parallel value, order alternating (median)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    args.threads = args.threads or os.cpu_count() or 1

    model = args.model or (DEMO_DIR if any(DEMO_DIR.glob("*.gguf")) else None)
    if model is None:
        sys.exit(f"no demo model at {DEMO_DIR} (make demo-model); pass --model DIR")
    pair = resolve_pair(model, args.mmproj)
    urls = [data_url(p) for p in IMAGES]
    values = [int(x) for x in args.parallel.split(",")]
    print(f"model {pair.llm_path.name} + {pair.mmproj_path.name}; --parallel {values}; threads {args.threads}",
          file=sys.stderr)

    srv = start_server(pair, parallel=1, threads=args.threads)
    try:
        reference = asyncio.run(single_answers(srv.url, urls, args.prompt, args.max_tokens))
    finally:
        srv.close()
    runs: dict[int, list[dict]] = {n: [] for n in values}
    with multiprocessing.get_context("spawn").Pool(1) as clients:
        clients.apply(import_openai)     # its import is not the first run's client CPU
        for rep in range(args.repeats):
            for n in (values if rep % 2 == 0 else values[::-1]):
                r = run_once(pair, n, urls, reference, args, clients)
                runs[n].append(r)
                print(f"  [{rep + 1}/{args.repeats}] --parallel {n}: {r['requests_per_s']:.2f} requests/s, "
                      f"{r['tokens_per_s']:.1f} tok/s, {r['complete']}/{r['requests']} complete, CPU engine "
                      f"{r['engine_cpu_s']:.2f} s, HTTP {r['http_cpu_s']:.2f} s, clients {r['client_cpu_s']:.2f} s, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    rows = [median_run(runs[n]) for n in values]
    print_table(rows, args, args.clients * args.requests)
    if len(rows) > 1:
        paired = [statistics.median(b["requests_per_s"] / a["requests_per_s"] for a, b in zip(runs[values[0]], runs[n]))
                  for n in values[1:]]
        for n, p in zip(values[1:], paired):
            print(f"\n--parallel {n} / --parallel {values[0]}: median of paired requests/s ratios {p:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model": str(pair.llm_path),
                                               "reference_answers": reference, "rows": rows,
                                               "runs": {str(n): rs for n, rs in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
