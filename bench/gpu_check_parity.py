"""The GPU checks that compare answers (bench/gpu_check.py runs them): GPU vs CPU, the same model.

    gpu.build          the models, built once into --model-dir (train/random_gguf.py)
    gpu.demo           the demo model's greedy answers, all on the GPU, equal those on the CPU
    gpu.llm-top1       top-1 of the 7B-wide F16 LLM on teacher-forced tokens, GPU vs CPU
    gpu.vision-parity  native and torch vision on the GPU vs the torch CPU fp32 reference
    gpu.train          `train stage1` and `train stage2 --lora` in bf16 on the GPU vs fp32 on the CPU

Each `check_*(env, prefix)` yields `Result`s; prefix "cpu" runs the same code on tiny models, on the
CPU only. `env` is the SimpleNamespace gpu_check.py builds from its arguments.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from llava_local.procs import signal_name

REPO = Path(__file__).resolve().parents[1]
GPU_LAYERS = 999                    # every layer on the GPU (explicit: engine defaults may change)
SAMPLES = REPO / "llava_local" / "data" / "samples"
COS_MIN = {"F32": 0.9999, "F16": 0.999}
LOSS_RTOL = 0.02                    # bf16 GPU vs fp32 CPU training loss, per step
TRAIN_STEPS = 5
# teacher-forced text for the top-1 comparison: ordinary English, tokenized by the LLM itself
TEXT = ("The quick brown fox jumps over the lazy dog near the river bank, while three children watch from a "
        "small wooden bridge. In the distance, a red kite circles above the hills, and the evening light turns "
        "the water gold before the first stars appear over the quiet village.")


@dataclass
class Result:
    """One line of the report (and one entry of --out)."""
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
# the demo model's answers
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


def serve_answers(gpu: bool, n_images: int, threads: int, parallel: int = 4) -> tuple[list[str], dict]:
    """The demo model behind `llava-local serve` (its engine process, batched decoding): the sample
    images asked all at once, greedy; the answers in image order and what the engine runs on."""
    import base64
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from llava_local.runtime.model_source import find_model
    from llava_local.runtime.options import EngineOptions
    from llava_local.server.launch import ServeOptions, Server
    engine = EngineOptions(vision_backend="native", gpu_layers=GPU_LAYERS if gpu else 0,
                           vision_device="gpu" if gpu else "cpu", threads=threads)
    srv = Server(find_model(None), engine, ServeOptions(port=0, parallel=parallel))
    url = srv.start_in_thread()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: never a proxy

    def ask(path: Path) -> str:
        image = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this picture."},
                                                          {"type": "image_url", "image_url": {"url": image}}]}],
                "temperature": 0, "max_tokens": 48}
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with opener.open(req, timeout=300) as r:
            return json.load(r)["choices"][0]["message"]["content"]
    try:
        srv.wait_ready(300)
        images = sorted(SAMPLES.glob("*.png"))[:n_images]
        with ThreadPoolExecutor(len(images)) as pool:
            return list(pool.map(ask, images)), dict(srv.engine.info)
    finally:
        srv.close()


def check_serve(env, prefix: str) -> Iterator[Result]:
    """`llava-local serve` with 4 concurrent requests (one llama.cpp batch) answers as a single request does."""
    gpu = prefix == "gpu"
    ref, _ = without_gpu(demo_answers, False, 4, env.threads) if gpu else demo_answers(False, 4, env.threads)
    got, info = serve_answers(gpu, 4, env.threads)
    same = sum(a == b for a, b in zip(ref, got))
    placed = info.get("llm_device") != "cpu" if gpu else True
    yield passed(same == len(ref) and placed, f"{prefix}.serve",
                 f"{same}/{len(ref)} greedy answers of 4 concurrent requests equal the single-request ones "
                 f"(engine: LLM on {info.get('llm_device')}, vision {info.get('vision_backend')} on "
                 f"{info.get('vision_device')})", served=got, reference=ref, engine=info)


# --------------------------------------------------------------------------------------------------
# LLM top-1 agreement on teacher-forced tokens
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
# vision parity
# --------------------------------------------------------------------------------------------------

def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def encode(backend: str, mmproj_path: Path, images, *, device: str, threads: int) -> tuple[np.ndarray, str]:
    from llava_local.formats.mmproj import read_mmproj
    from llava_local.vision import VisionOptions, create_backend
    b = create_backend(backend, read_mmproj(mmproj_path),
                       VisionOptions(device=device, threads=threads, max_batch=len(images)))
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
# training, bf16 on the GPU vs fp32 on the CPU
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

