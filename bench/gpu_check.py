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
  gpu.train              `train stage1` and `train stage2 --lora`, 5 steps in bf16 on the GPU vs fp32
                         on the CPU, tiny model: |Δloss| <= 2 % at every step
The CPU half (cpu.*) runs the same code paths on tiny models, so the script cannot rot on machines
without a GPU; where there is one it runs with --tiny or --checks cpu. The models
(train/random_gguf.py: a LLaVA-1.5-7B-wide LLM of --llm-layers layers at F16 and Q4_K_M, a CLIP
ViT-L/14-336 mmproj at F32 and F16) are built once into --model-dir and reused.

Each group of checks runs in a child process (`-X faulthandler`; the GPU checks one per process):
llama.cpp has been seen to die with SIGSEGV while loading a model on CUDA, and such a death is then
that check's FAIL, with the signal, while the other checks still run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))      # the benches reused below import each other by name

GPU_LAYERS = 999                    # every layer on the GPU (explicit: engine defaults may change)
SAMPLES = REPO / "llava_local" / "data" / "samples"
MODEL_DIR = REPO / ".cache" / "gpu-check"
COS_MIN = {"F32": 0.9999, "F16": 0.999}
TOKENS_PER_IMAGE = 32
CAPTION_GOAL = 3.0                  # caption --parallel 8 vs the handler loop, images/s
ENCODER_GOAL = 1.3                  # native vs mtmd at batch 8, images/s
LOSS_RTOL = 0.02                    # bf16 GPU vs fp32 CPU training loss, per step
# Test-only fault injection (tests/test_gpu_check.py): the child running this check kills itself with
# SIGSEGV as the check starts, as llama.cpp has done on CUDA. Never set in normal use.
TEST_CRASH_ENV = "_GPU_CHECK_TEST_CRASH"
TRAIN_STEPS = 5
# The CPU half's tiny models gain nothing from threads, and on a shared machine llama.cpp's per-op
# thread barriers cost more than they save (a tiny caption: 4 s with 2 threads at load 9, 0.1 s with 1)
CPU_HALF_THREADS = 1
# teacher-forced text for the top-1 comparison: ordinary English, tokenized by the LLM itself
TEXT = ("The quick brown fox jumps over the lazy dog near the river bank, while three children watch from a "
        "small wooden bridge. In the distance, a red kite circles above the hills, and the evening light turns "
        "the water gold before the first stars appear over the quiet village.")


@dataclass
class Result:
    status: str          # PASS | FAIL | SKIP
    check: str
    figure: str
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.figure}"


def passed(ok: bool, check: str, figure: str, **data) -> Result:
    return Result("PASS" if ok else "FAIL", check, figure, data)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def tiny_files(env, quantize=()):
    from train.random_gguf import TINY, build_pair
    return build_pair(Path(env.model_dir) / "tiny", TINY, outtypes=("f32", "f16"), quantize=quantize)


def gpu_files(env):
    """The GPU checks' pair: LLaVA-1.5-7B-wide (or the tiny one with --tiny)."""
    from train.random_gguf import LLAVA15_7B_WIDE, build_pair
    if env.tiny:
        return tiny_files(env, quantize=("Q4_K_M",))
    spec = replace(LLAVA15_7B_WIDE, llm=replace(LLAVA15_7B_WIDE.llm, n_layer=env.llm_layers))
    return build_pair(Path(env.model_dir) / "7b-wide", spec, outtypes=("f16",), quantize=("Q4_K_M",),
                      mmproj_outtypes=("f32", "f16"))


def pair_of(files, llm_type: str, mmproj_type: str = "F16"):
    from llava_local.runtime.model_pair import resolve_pair
    return resolve_pair(files.llm[llm_type], files.mmproj[mmproj_type])


def describe(files) -> str:
    return ", ".join(f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in [*files.llm.values(), *files.mmproj.values()])


def without_gpu(fn, *args):
    """fn(*args) in a fresh process that sees no CUDA device. A CPU reference needs it: with a GPU
    present llama.cpp computes large batches there even at gpu_layers=0 (op offload, batches >= 32)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""       # read by the process spawned at submit()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def check_build(env, prefix: str) -> Iterator[Result]:
    files = gpu_files(env) if prefix == "gpu" else tiny_files(env)
    yield Result("PASS", f"{prefix}.build", f"{files.spec.name} in {files.seconds:.1f} s "
                 f"({'built' if files.seconds else 'reused'}): {describe(files)}",
                 {"seconds": files.seconds, "files": {p.name: p.stat().st_size for p in
                                                     [*files.llm.values(), *files.mmproj.values()]}})


# --------------------------------------------------------------------------------------------------
# 1. the demo model's answers
# --------------------------------------------------------------------------------------------------

def demo_answers(gpu: bool, n_images: int, threads: int) -> tuple[list[str], str]:
    import llava_local
    m = llava_local.load(vision_backend="native", gpu_layers=GPU_LAYERS if gpu else 0,
                         vision_device="gpu" if gpu else "cpu", threads=threads)
    try:
        answers = [m.ask(str(p), "Describe this picture.", max_tokens=48)
                   for p in sorted(SAMPLES.glob("*.png"))[:n_images]]
        return answers, m.engine.vision.device_name
    finally:
        m.close()


def check_demo(env, prefix: str) -> Iterator[Result]:
    n = 2 if prefix == "cpu" else 4
    if prefix == "cpu":
        ref, ref_dev = demo_answers(False, n, env.threads)
        again, _ = demo_answers(False, n, env.threads)
        same = sum(a == b for a, b in zip(ref, again))
        yield passed(same == len(ref) and len(ref) > 0, "cpu.demo",
                     f"{same}/{len(ref)} greedy answers equal across two loads (vision on {ref_dev}); "
                     f"first: {ref[0][:60]!r}", answers=ref)
        return
    ref, ref_dev = without_gpu(demo_answers, False, n, env.threads)
    got, dev = demo_answers(True, n, env.threads)
    same = sum(a == b for a, b in zip(ref, got))
    on_gpu = dev.upper() != "CPU"
    yield passed(same == len(ref) and on_gpu, "gpu.demo",
                 f"{same}/{len(ref)} greedy answers equal, GPU (vision on {dev}) vs CPU"
                 + ("" if on_gpu else "; the native encoder fell back to the CPU"),
                 gpu=got, cpu=ref, vision_device=dev)


# --------------------------------------------------------------------------------------------------
# 2. LLM top-1 agreement on teacher-forced tokens
# --------------------------------------------------------------------------------------------------

def forced_logits(path: Path, n_tokens: int, gpu_layers: int, threads: int) -> np.ndarray:
    from llava_local.runtime.llm import LlamaLLM
    llm = LlamaLLM(path, n_ctx=256, n_gpu_layers=gpu_layers, n_threads=threads, all_logits=True)
    try:
        ids = ([llm.bos] if llm.bos is not None else []) + llm.tokenize(TEXT)
        if len(ids) < n_tokens:
            raise ValueError(f"the check text has {len(ids)} tokens, fewer than {n_tokens}")
        llm.eval_tokens(ids[:n_tokens])
        return llm.all_position_logits()
    finally:
        llm.close()


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Positions where the top-1 differs are explained by rounding when, in the reference's own logits,
    its top-1 beats the other's pick by less than the largest logit difference at that position."""
    a, b = ref.argmax(-1), got.argmax(-1)
    diff = np.abs(ref - got).max(-1)
    rows = np.arange(len(a))
    margin = ref[rows, a] - ref[rows, b]
    mismatch = np.flatnonzero(a != b)
    unexplained = [int(i) for i in mismatch if margin[i] > diff[i]]
    return {"positions": len(a), "agree": int((a == b).sum()), "mismatch": mismatch.tolist(),
            "unexplained": unexplained, "max_abs_logit_diff": float(diff.max()),
            "logit_std": float(ref.std())}


def check_llm_top1(env, prefix: str) -> Iterator[Result]:
    n = 48
    if prefix == "cpu":
        files = tiny_files(env)
        ref = without_gpu(forced_logits, files.llm["F32"], n, 0, env.threads)   # as the GPU check's reference
        got = forced_logits(files.llm["F16"], n, 0, env.threads)
        what, name = "F16 vs F32 on the CPU (tiny)", "cpu.llm-top1"
    else:
        files = gpu_files(env)
        ref = without_gpu(forced_logits, files.llm["F16"], n, 0, env.threads)
        got = forced_logits(files.llm["F16"], n, GPU_LAYERS, env.threads)
        what, name = f"GPU vs CPU, {files.llm['F16'].name}", "gpu.llm-top1"
    r = top1_agreement(ref, got)
    ok = r["agree"] >= 0.95 * r["positions"] and not r["unexplained"]
    yield passed(ok, name, f"{r['agree']}/{r['positions']} teacher-forced top-1 equal, {what}; max |Δlogit| "
                 f"{r['max_abs_logit_diff']:.3g} (logit std {r['logit_std']:.3g})"
                 + (f"; differing where no near-tie explains it: {r['unexplained']}" if r["unexplained"] else ""), **r)


# --------------------------------------------------------------------------------------------------
# 3. vision parity
# --------------------------------------------------------------------------------------------------

def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def encode(backend: str, mmproj_path: Path, images, *, device: str, threads: int) -> tuple[np.ndarray, str]:
    from llava_local.formats.mmproj import read_mmproj
    from llava_local.vision import create_backend
    b = create_backend(backend, read_mmproj(mmproj_path), vision_device=device, threads=threads,
                       max_batch=len(images))
    try:
        return b.encode(images), getattr(b, "device_name", str(getattr(b, "device", device)))
    finally:
        b.close()


def check_vision_parity(env, prefix: str) -> Iterator[Result]:
    from PIL import Image
    from vision_encoders import images as random_images
    imgs = random_images(1) + [Image.open(sorted(SAMPLES.glob("*.png"))[0]).convert("RGB")]
    files = tiny_files(env) if prefix == "cpu" else gpu_files(env)
    for outtype in ("F32", "F16"):
        path = files.mmproj[outtype]
        ref, _ = encode("torch", path, imgs, device="cpu", threads=env.threads)
        sides = [("native", "cpu", True)] if prefix == "cpu" else \
                [("native", "gpu", env.llama_gpu), ("torch", "gpu", env.torch_cuda)]
        for backend, device, available in sides:
            name = f"{prefix}.vision-parity.{backend}.{outtype}"
            if not available:
                yield Result("SKIP", name, "torch.cuda.is_available() is False" if backend == "torch"
                             else "llama.cpp has no GPU offload")
                continue
            got, dev = encode(backend, path, imgs, device=device, threads=env.threads)
            cos = min_cosine(ref, got)
            wrong_device = device == "gpu" and dev.upper() in ("CPU", "")
            yield passed(cos >= COS_MIN[outtype] and not wrong_device, name,
                         f"min per-token cosine {cos:.7f} (>= {COS_MIN[outtype]}) vs torch CPU fp32, {backend} on "
                         f"{dev}, {path.name}, {len(imgs)} images" + ("; ran on the CPU, not the GPU" if wrong_device
                                                                      else ""),
                         min_cosine=cos, device=dev, max_abs=float(np.abs(ref - got).max()))


# --------------------------------------------------------------------------------------------------
# 4. caption throughput vs the handler loop
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def patched(obj, name: str, value):
    """The benches reused here build their engines themselves; this gives them the GPU options."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def forcing(fn, **forced):
    """fn with these keyword arguments whatever its caller passes (a partial would let the caller's win)."""
    return lambda *args, **kw: fn(*args, **(kw | forced))


def llama_with_layers(gpu_layers: int):
    import llama_cpp
    return patched(llama_cpp, "Llama", forcing(llama_cpp.Llama, n_gpu_layers=gpu_layers))


def eog_bias(llm) -> dict[int, float]:
    """logit_bias that makes every end-of-generation token impossible (llama.cpp's --ignore-eos)."""
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {t: -math.inf for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}


def handler_loop(pair, args, gpu_layers: int):
    """bench/caption_throughput.py's plain loop, on the GPU when asked, with EOS suppressed."""
    from caption_throughput import PlainLoop
    with llama_with_layers(gpu_layers):
        loop = PlainLoop(pair, args)
    loop.llm.create_chat_completion = forcing(loop.llm.create_chat_completion, logit_bias=eog_bias(loop.llm))
    return loop


def check_caption_throughput(env, prefix: str) -> Iterator[Result]:
    import caption_throughput as ct
    from llava_local.caption.job import PROMPTS
    from llava_local.caption.worker import WorkerConfig
    gpu = prefix == "gpu"
    files = gpu_files(env) if gpu else tiny_files(env)
    work = Path(tempfile.mkdtemp(prefix="caption-", dir=env.work_dir))
    image_dir = work / "images"
    images = ct.make_images(image_dir, env.images)
    parallels = (1, 8, 32) if gpu else (8,)
    args = SimpleNamespace(prompt=PROMPTS["short"], max_tokens=TOKENS_PER_IMAGE, io_threads=4,
                           vision_backend="native", threads=env.threads)
    worker = forcing(WorkerConfig, gpu_layers=GPU_LAYERS if gpu else 0, vision_device="gpu" if gpu else "cpu",
                     vision_backend="native", ignore_eos=True)
    for llm_type in (("F16", "Q4_K_M") if gpu else ("F16",)):
        pair = pair_of(files, llm_type)
        rows = []
        with patched(ct, "WorkerConfig", worker):
            for n in parallels:
                rows.append(ct.bench_caption(pair, image_dir, work, parallel=n, args=args))
        loop = handler_loop(pair, args, GPU_LAYERS if gpu else 0)
        try:
            loop(images[:1])                    # warm-up: first-call allocations out of the timing
            rows.append(loop(images))
        finally:
            loop.llm.close()
        base = rows[-1]["images_per_s"]
        p8 = next(r for r in rows if r["system"].endswith("--parallel 8"))["images_per_s"]
        # llama-cpp-python does not stop at max_tokens while the text ends inside a UTF-8 character
        # (create_completion's multibyte_fix): its captions may run up to 3 tokens longer
        tokens_ok = (all(r["tokens_per_caption"] == TOKENS_PER_IMAGE and not r["failed"] for r in rows[:-1])
                     and TOKENS_PER_IMAGE <= rows[-1]["tokens_per_caption"] <= TOKENS_PER_IMAGE + 3)
        fig = ", ".join(f"{r['system'].replace('llava-local caption ', '')} {r['images_per_s']:.2f}" for r in rows)
        goal = f"goal >= {CAPTION_GOAL:g}x {'met' if p8 >= CAPTION_GOAL * base else 'NOT met'}"
        yield passed(tokens_ok, f"{prefix}.caption-throughput.{llm_type}",
                     f"images/s: {fig}; --parallel 8 / loop = {p8 / base:.2f}x ({goal}); {len(images)} images, "
                     f"tokens per caption {[round(r['tokens_per_caption'], 2) for r in rows]} (EOS ignored: "
                     f"{TOKENS_PER_IMAGE}{'' if tokens_ok else ' expected; EOS not ignored?'})",
                     rows=[{k: v for k, v in r.items() if k != "captions"} for r in rows],
                     ratio_parallel8_vs_loop=p8 / base, goal=CAPTION_GOAL)


# --------------------------------------------------------------------------------------------------
# 5. native vs mtmd encoder throughput
# --------------------------------------------------------------------------------------------------

def check_encoder_throughput(env, prefix: str) -> Iterator[Result]:
    from vision_encoders import time_backends
    gpu = prefix == "gpu"
    files = gpu_files(env) if gpu else tiny_files(env)
    batches = [1, 8, 32] if gpu else [1, 8]
    rows = time_backends(files.llm["F16"], files.mmproj["F16"], ["native", "mtmd"], batches, threads=env.threads,
                         repeats=3 if gpu else 1, vision_device="gpu" if gpu else "cpu", label="F16")
    cell = {(r["backend"], r["batch"]): r["images_per_s"] for r in rows}
    ratio = {b: cell[("native", b)] / cell[("mtmd", b)] for b in batches}
    fig = "; ".join(f"batch {b}: native {cell[('native', b)]:.1f}, mtmd {cell[('mtmd', b)]:.1f} ({ratio[b]:.2f}x)"
                    for b in batches)
    goal = f"goal native >= {ENCODER_GOAL:g}x mtmd at batch 8 {'met' if ratio[8] >= ENCODER_GOAL else 'NOT met'}"
    yield passed(all(math.isfinite(v) and v > 0 for v in cell.values()), f"{prefix}.encoder-throughput",
                 f"images/s, {files.mmproj['F16'].name}: {fig} ({goal})", rows=rows,
                 ratio_batch8=ratio[8], goal=ENCODER_GOAL)


# --------------------------------------------------------------------------------------------------
# 6. a 3-turn chat vs the handler
# --------------------------------------------------------------------------------------------------

def check_chat(env, prefix: str) -> Iterator[Result]:
    import chat_kv_reuse as chat
    from llava_local.runtime import engine as engine_mod
    gpu = prefix == "gpu"
    files = gpu_files(env) if gpu else tiny_files(env)
    pair = pair_of(files, "F16")
    image = chat.sample_image(None)
    turns, max_tokens = 3, 32
    n_ctx = min(4096, pair.n_ctx_train or 4096)
    layers = GPU_LAYERS if gpu else 0
    with patched(engine_mod, "Engine", forcing(engine_mod.Engine, n_gpu_layers=layers,
                                               vision_device="gpu" if gpu else "cpu")):
        ours, stats = chat.run_ours(pair, image, turns, max_tokens, "native", env.threads)
    with llama_with_layers(layers):
        theirs, stats2 = chat.run_llama_cpp_python(pair, image, turns, max_tokens, env.threads, n_ctx)
    once = stats["images_encoded"] == 1
    yield passed(once, f"{prefix}.chat",
                 f"{turns}-turn conversation: llava-local {ours:.3f} s, Llava15ChatHandler {theirs:.3f} s "
                 f"({theirs / ours:.2f}x); image encoded {stats['images_encoded']}x by the session; generated "
                 f"{stats['generated']} vs {stats2['generated']} tokens", seconds=ours, handler_seconds=theirs,
                 speedup=theirs / ours, **{k: v for k, v in stats.items() if k != "backend"})


# --------------------------------------------------------------------------------------------------
# 7. training, bf16 on the GPU vs fp32 on the CPU
# --------------------------------------------------------------------------------------------------

STAGES = {   # name -> (CLI args, which file of the data split); stage 2 starts from the tiny model too
    "stage1": (["stage1", "--lr", "1e-3"], "captions"),
    "stage2-lora": (["stage2", "--lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
                     "--lr", "1e-3"], "instruct"),
}


def stage_argv(stage: str, model: Path, split, out: Path, *, bf16: bool, threads: int) -> list[str]:
    """`llava-local train ...` arguments: TRAIN_STEPS steps of 4 sequences in micro-batches of 2."""
    args, data = STAGES[stage]
    return [*args, "--model", str(model), "--data", str(getattr(split, data)), "--out", str(out),
            "--max-steps", str(TRAIN_STEPS), "--batch-size", "4", "--micro-batch-size", "2", "--log-every", "1",
            "--precision", "bf16" if bf16 else "fp32", "--threads", str(threads)]


def start_training(argv: list[str], *, gpu: bool) -> subprocess.Popen:
    env = dict(os.environ)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""     # the loop trains on CUDA whenever it sees a device
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "train.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish_training(proc: subprocess.Popen, timeout: float) -> None:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise RuntimeError(f"training exited with {signal_name(proc.returncode)}: {tail}")


def logged_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def check_train(env, prefix: str) -> Iterator[Result]:
    from train.shapes import write_dataset
    from train.tiny_models import build_tiny_llava
    root = Path(tempfile.mkdtemp(prefix="train-", dir=env.work_dir))
    build_tiny_llava(root / "tiny-hf")
    split = write_dataset(root / "shapes", n_train=16, n_eval=4, n_text=8, seed=0, turns=(2, 3))
    argv = {(stage, d): stage_argv(stage, root / "tiny-hf", split, root / f"{stage}-{d}", bf16=d == "gpu",
                                   threads=max(1, env.threads // len(STAGES)) if d == "cpu" else 2)
            for stage in STAGES for d in (("cpu", "gpu") if prefix == "gpu" else ("cpu",))}
    if prefix == "cpu":
        # the CPU half's process sees no GPU and has torch loaded: the same CLI, in-process
        from train.cli import train as train_cli
        with contextlib.redirect_stdout(sys.stderr):     # it prints the output directory
            for a in argv.values():
                train_cli.main(a, standalone_mode=False)
    else:
        # GPU runs and their CPU references side by side (they share nothing but the inputs), each
        # in its own process: the reference must not see the GPU, and a crash costs one run
        procs = [start_training(a, gpu=k[1] == "gpu") for k, a in argv.items()]
        try:
            for p in procs:
                finish_training(p, env.check_timeout)
        finally:
            for p in procs:
                if p.poll() is None:     # one run failed: do not leave the others behind
                    p.kill()
                    p.wait()
    for stage in STAGES:
        name, cpu = f"{prefix}.train.{stage}", logged_losses(root / f"{stage}-cpu")
        if prefix == "cpu":
            ok = len(cpu) == TRAIN_STEPS and all(math.isfinite(x) for x in cpu)
            yield passed(ok, name, f"{len(cpu)} fp32 steps on the CPU, losses " + " ".join(f"{x:.4f}" for x in cpu),
                         cpu=cpu)
            continue
        bf16 = logged_losses(root / f"{stage}-gpu")
        rel = [abs(g - c) / abs(c) for g, c in zip(bf16, cpu)]
        ok = len(bf16) == len(cpu) == TRAIN_STEPS and max(rel) <= LOSS_RTOL
        losses = " vs fp32 CPU ".join(" ".join(f"{x:.4f}" for x in run) for run in (bf16, cpu))
        yield passed(ok, name, f"max |Δloss| {100 * max(rel):.2f} % (<= {100 * LOSS_RTOL:g} %) over {len(rel)} steps, "
                     f"bf16 GPU {losses}", gpu=bf16, cpu=cpu, rel=rel)


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
                               ("chat", check_chat, "llama"), ("train", check_train, "torch"))]
BY_NAME = {c.name: c for c in CHECKS}


def signal_name(rc: int | None) -> str:
    if rc is None:
        return "no exit status"
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


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
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
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
