"""The GPU checks that measure speed (bench/gpu_check.py runs them), against llama-cpp-python and mtmd.

    gpu.caption-throughput `caption --parallel 1/8/32` vs a llama-cpp-python Llava15ChatHandler loop,
                           32 tokens per image, EOS ignored (goal: --parallel 8 >= 3x the loop)
    gpu.encoder-throughput native vs mtmd images/s at batch 1/8/32 (goal: native >= 1.3x at batch 8)
    gpu.chat               a 3-turn chat session vs the handler (bench/chat_kv_reuse.py)

They reuse the benches of those comparisons (caption_throughput.py, vision_encoders.py,
chat_kv_reuse.py), which build their engines themselves: `patched` and `forcing` hand them the GPU
options. A throughput figure below its goal is reported, not failed: the checks fail on wrong output.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from gpu_check_parity import GPU_LAYERS, Result, gpu_files, pair_of, passed, tiny_files

TOKENS_PER_IMAGE = 32
CAPTION_GOAL = 3.0                  # caption --parallel 8 vs the handler loop, images/s
ENCODER_GOAL = 1.3                  # native vs mtmd at batch 8, images/s


# --------------------------------------------------------------------------------------------------
# caption throughput vs the handler loop
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


def worker_config(gpu: bool):
    """WorkerConfig as caption_throughput.py builds it, with the GPU options of its engine and EOS
    ignored whatever that bench passes."""
    from llava_local.caption.worker import WorkerConfig
    from llava_local.runtime.options import EngineOptions

    def make(*args, **kw):
        engine = replace(kw.pop("engine", EngineOptions()), gpu_layers=GPU_LAYERS if gpu else 0,
                         vision_device="gpu" if gpu else "cpu", vision_backend="native")
        return WorkerConfig(*args, **(kw | {"engine": engine, "ignore_eos": True}))
    return make


def check_caption_throughput(env, prefix: str) -> Iterator[Result]:
    import caption_throughput as ct
    from llava_local.prompts.presets import PROMPTS
    gpu = prefix == "gpu"
    files = gpu_files(env) if gpu else tiny_files(env)
    work = Path(tempfile.mkdtemp(prefix="caption-", dir=env.work_dir))
    image_dir = work / "images"
    images = ct.make_images(image_dir, env.images)
    parallels = (1, 8, 32) if gpu else (8,)
    args = SimpleNamespace(prompt=PROMPTS["short"], max_tokens=TOKENS_PER_IMAGE, io_threads=4,
                           vision_backend="native", threads=env.threads)
    worker = worker_config(gpu)
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
# native vs mtmd encoder throughput
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
# a 3-turn chat vs the handler
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
    with patched(engine_mod, "Engine", forcing(engine_mod.Engine, gpu_layers=layers,
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

