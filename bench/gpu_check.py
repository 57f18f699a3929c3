"""`make gpu-check`: does llava-local run right, and fast, on this machine's GPU?

    python -X faulthandler bench/gpu_check.py      # GPU checks on LLaVA-1.5-7B-wide models (no GPU: the CPU half)
    python bench/gpu_check.py --tiny               # tiny models everywhere (what tests/test_gpu_check.py runs)
    python bench/gpu_check.py --checks gpu.chat,gpu.train --out figures.json
    bash .device/build.sh && make gpu-check PY=/tmp/venv/bin/python   # an offline GPU machine with its own build

One line per result, `PASS|FAIL|SKIP <check>: <figure or reason>`; the exit status is 1 when any
check fails. Every result, with its figures, also goes to --out (default $OUT/gpu_check.json when
$OUT is set), rewritten after each check so a run cut short still brings its figures back.

GPU checks (SKIP, with the reason, where llama.cpp has no GPU offload or torch no CUDA):
  gpu.demo               the demo model's greedy answers, all on the GPU, equal those on the CPU
  gpu.llm-top1           top-1 of the 7B-wide F16 LLM on teacher-forced tokens, GPU vs CPU
  gpu.vision-parity      native and torch vision on the GPU vs the torch CPU fp32 reference, CLIP
                         ViT-L/14-336: min per-token cosine >= 0.9999 (F32), 0.999 (F16)
  gpu.caption-throughput `caption --parallel 1/8/32` vs a llama-cpp-python Llava15ChatHandler loop,
                         32 tokens per image, EOS ignored (goal: --parallel 8 >= 3x the loop)
  gpu.encoder-throughput native vs mtmd images/s at batch 1/8/32 (goal: native >= 1.3x at batch 8)
  gpu.chat               a 3-turn chat session vs the handler (bench/chat_kv_reuse.py)
  gpu.serve              `llava-local serve`, all on the GPU: 4 concurrent requests (one llama.cpp batch)
                         give the demo model's single-request greedy answers on the CPU
  gpu.train              `train stage1` and `train stage2 --lora`, 5 steps in bf16 on the GPU vs fp32
                         on the CPU, tiny model: |Δloss| <= 2 % at every step
The CPU half (cpu.*) runs the same code paths on tiny models, so the script cannot rot on machines
without a GPU; where there is one it runs with --tiny or --checks cpu. The models
(train/random_gguf.py: a LLaVA-1.5-7B-wide LLM of --llm-layers layers at F16 and Q4_K_M, a CLIP
ViT-L/14-336 mmproj at F32 and F16) are built once into --model-dir and reused.

Each group of checks runs in a child process (`-X faulthandler`; the GPU checks one per process):
llama.cpp has been seen to die with SIGSEGV while loading a model on CUDA, and such a death is then
that check's FAIL, with the signal, while the other checks still run.

This file is the plan, the child processes and the report; the checks themselves are in
gpu_check_parity.py (the same answers on GPU and CPU) and gpu_check_speed.py (speed against
llama-cpp-python and mtmd).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))      # the checks and the benches they reuse import each other by name

from gpu_check_parity import (Result, check_build, check_demo, check_llm_top1, check_serve, check_train,  # noqa: E402
                              check_vision_parity)
from gpu_check_speed import check_caption_throughput, check_chat, check_encoder_throughput  # noqa: E402

from llava_local.procs import signal_name  # noqa: E402

MODEL_DIR = REPO / ".cache" / "gpu-check"
# Test-only fault injection (tests/test_gpu_check.py): the child running this check kills itself with
# SIGSEGV as the check starts, as llama.cpp has done on CUDA. Never set in normal use.
TEST_CRASH_ENV = "_GPU_CHECK_TEST_CRASH"
# The CPU half's tiny models gain nothing from threads, and on a shared machine llama.cpp's per-op
# thread barriers cost more than they save (a tiny caption: 4 s with 2 threads at load 9, 0.1 s with 1)
CPU_HALF_THREADS = 1


# --------------------------------------------------------------------------------------------------
# The plan, the child processes, the report
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str                  # e.g. "gpu.chat"; its results are named "gpu.chat" or "gpu.chat.<part>"
    run: Callable
    needs: str = ""            # "llama": llama.cpp GPU offload; "torch": CUDA; "any": either; "": none

    @property
    def prefix(self) -> str:
        return self.name.split(".")[0]


CHECKS = [Check(f"{p}.{n}", fn, needs if p == "gpu" else "")
          for p in ("cpu", "gpu")
          for n, fn, needs in (("build", check_build, "any"), ("demo", check_demo, "llama"),
                               ("llm-top1", check_llm_top1, "llama"), ("vision-parity", check_vision_parity, "any"),
                               ("caption-throughput", check_caption_throughput, "llama"),
                               ("encoder-throughput", check_encoder_throughput, "llama"),
                               ("chat", check_chat, "llama"), ("serve", check_serve, "llama"),
                               ("train", check_train, "torch"))]
BY_NAME = {c.name: c for c in CHECKS}

def probe() -> dict:
    """llama.cpp's GPU offload, torch's CUDA, versions."""
    import llama_cpp
    info = {"llama_gpu": bool(llama_cpp.llama_supports_gpu_offload()), "llama_cpp_python": llama_cpp.__version__}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=bool(torch.cuda.is_available()))
        if info["torch_cuda"]:
            info["gpu_name"] = torch.cuda.get_device_name(0)
    except ImportError:
        info.update(torch=None, torch_cuda=False)
    return info


def skip_reason(check: Check, machine: dict) -> str | None:
    no_llama = "llama.cpp has no GPU offload (llama_cpp.llama_supports_gpu_offload() is False)"
    no_torch = "torch.cuda.is_available() is False"
    if check.needs == "llama" and not machine["llama_gpu"]:
        return no_llama
    if check.needs == "torch" and not machine["torch_cuda"]:
        return no_torch
    if check.needs == "any" and not (machine["llama_gpu"] or machine["torch_cuda"]):
        return f"no GPU: {no_llama}; {no_torch}"
    return None


def child_main(args) -> None:
    """Run the named checks in order, appending events to --events as each starts and ends."""
    from llava_local.logs import setup_logging
    setup_logging(False)
    env = json.loads(args.child_env)

    def emit(**event):
        with open(args.events, "a") as f:
            f.write(json.dumps(event) + "\n")
    if args.child == "probe":
        emit(event="probe", machine=probe())
        return
    for name in args.child.split(","):
        check = BY_NAME[name]
        emit(event="start", check=name)
        if os.environ.get(TEST_CRASH_ENV) == name:
            os.kill(os.getpid(), signal.SIGSEGV)
        t0 = time.perf_counter()
        check_env = SimpleNamespace(**(env | ({"threads": CPU_HALF_THREADS} if check.prefix == "cpu" else {})))
        try:
            for r in check.run(check_env, check.prefix):
                emit(event="result", status=r.status, check=r.check, figure=r.figure, data=r.data)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            emit(event="result", status="FAIL", check=name, figure=f"{type(exc).__name__}: {exc}", data={})
        emit(event="end", check=name, seconds=time.perf_counter() - t0)


def child_command(names: str, events: Path, env: dict) -> list[str]:
    return [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--child", names,
            "--events", str(events), "--child-env", json.dumps(env)]


def run_children(names: list[str], env: dict, work: Path, timeout: float, *,
                 hide_gpu: bool = False) -> Iterator[Result | tuple[str, float]]:
    """Run `names` in order in a child process; a check running when its child dies gets a FAIL that
    names the signal, and the checks after it go on in a new child. Yields results and (check, seconds).
    `hide_gpu`: the child sees no CUDA device (the CPU half must not use the GPU by accident)."""
    child_env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": ""} if hide_gpu else {})
    todo = list(names)
    while todo:
        events = Path(tempfile.mkstemp(prefix="events-", suffix=".jsonl", dir=work)[1])
        try:
            rc = subprocess.run(child_command(",".join(todo), events, env), cwd=REPO, env=child_env,
                                timeout=timeout * len(todo)).returncode
            why = signal_name(rc)
        except subprocess.TimeoutExpired:
            rc, why = None, f"timed out after {timeout * len(todo):.0f} s, killed"
        started, ended = [], set()
        for line in events.read_text().splitlines():
            e = json.loads(line)
            if e["event"] == "start":
                started.append(e["check"])
            elif e["event"] == "end":
                ended.add(e["check"])
                yield e["check"], e["seconds"]
            else:
                yield Result(e["status"], e["check"], e["figure"], e["data"])
        events.unlink()
        for n in started:
            if n not in ended:
                yield Result("FAIL", n, f"its process died ({why})", {"exit": why})
        if not started:              # died before the first check began: a retry would too
            for n in todo:
                yield Result("FAIL", n, f"the check process died before starting ({why})", {"exit": why})
            return
        todo = [n for n in todo if n not in started]


class Probe:
    """What this machine offers, asked in a child (initialising a GPU backend can crash too) that
    runs while the CPU half does."""

    def __init__(self, env: dict, work: Path):
        self.events = Path(tempfile.mkstemp(prefix="probe-", suffix=".jsonl", dir=work)[1])
        self.proc = subprocess.Popen(child_command("probe", self.events, env), cwd=REPO)

    def result(self) -> dict:
        try:
            rc = self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        lines = self.events.read_text().splitlines()
        self.events.unlink()
        if rc != 0 or not lines:
            return {"llama_gpu": False, "torch_cuda": False, "probe_failed": signal_name(rc)}
        return json.loads(lines[-1])["machine"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tiny", action="store_true", help="tiny models for the GPU checks too (seconds, not minutes)")
    ap.add_argument("--checks", default="", help="comma-separated check names or prefixes (e.g. cpu,gpu.chat)")
    ap.add_argument("--llm-layers", type=int, default=8, help="layers of the 7B-wide LLM (Vicuna-7B has 32)")
    ap.add_argument("--images", type=int, default=None, help="images per captioning run (default: 32 GPU, 8 --tiny)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--model-dir", default=str(MODEL_DIR),
                    help="models are built here once (their names change with their spec and code)")
    ap.add_argument("--work-dir", default=None, help="scratch files (default: a temporary directory, removed)")
    ap.add_argument("--out", default=str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None,
                    help="JSON of every result (default: $OUT/gpu_check.json when $OUT is set)")
    ap.add_argument("--check-timeout", type=float, default=300.0, help="seconds before a check's process is killed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--events", help=argparse.SUPPRESS)
    ap.add_argument("--child-env", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return 0

    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        return run_checks(args, work)


def run_checks(args, work: Path) -> int:
    t0 = time.perf_counter()
    env = {"tiny": args.tiny, "work_dir": str(work), "model_dir": args.model_dir, "threads": args.threads,
           "llm_layers": args.llm_layers, "images": args.images or (8 if args.tiny else 32),
           "check_timeout": args.check_timeout}
    probe_child = Probe(env, work)
    machine: dict = {}

    wanted = [w for w in args.checks.split(",") if w]
    selected = [c for c in CHECKS if not wanted or any(c.name.startswith(w) for w in wanted)]
    results: list[Result] = []
    seconds: dict[str, float] = {}

    def report(r: Result) -> None:
        results.append(r)
        print(r.line(), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({
                "machine": machine, "args": vars(args), "seconds_so_far": time.perf_counter() - t0,
                "check_seconds": seconds, "results": [r.__dict__ for r in results]}, indent=2, default=str))

    def run(names: list[str], **kw) -> None:
        for item in run_children(names, env, work, args.check_timeout, **kw):
            if isinstance(item, Result):
                report(item)
            else:
                seconds[item[0]] = round(item[1], 2)

    cpu = [c.name for c in selected if c.prefix == "cpu"]
    if not args.tiny and not any(w.startswith("cpu") for w in wanted):
        # a full run on a GPU machine spends its time on the GPU checks (the budget there is minutes)
        machine.update(probe_child.result())
        if machine["llama_gpu"] or machine["torch_cuda"]:
            for name in cpu:
                report(Result("SKIP", name, "a GPU is here: its checks run instead (the CPU half: --tiny, "
                                            "or --checks cpu)"))
            cpu = []
    if cpu:
        run(cpu, hide_gpu=True)                  # the CPU half shares one process: imports paid once
    if not machine:
        machine.update(probe_child.result())
    env.update(llama_gpu=machine["llama_gpu"], torch_cuda=machine["torch_cuda"])
    print(f"machine: {json.dumps(machine)}", file=sys.stderr)
    if "probe_failed" in machine:
        report(Result("FAIL", "probe", f"importing llama_cpp and torch died ({machine['probe_failed']})"))
    for c in selected:
        if c.prefix == "gpu":
            why = skip_reason(c, machine)
            if why:
                report(Result("SKIP", c.name, why))
            else:
                run([c.name])                    # one process per GPU check: a crash costs one check
    n = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu-check: {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped in "
          f"{time.perf_counter() - t0:.1f} s; seconds per check: {json.dumps(seconds)}", file=sys.stderr)
    return 1 if n["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
