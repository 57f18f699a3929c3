"""Multi-turn chat about one image: llava-local's session (KV cache kept, image encoded once) against
llama-cpp-python's `Llava15ChatHandler` (what a user of that library writes: the whole conversation
re-sent each turn; the handler resets the cache and re-encodes the image every call).

    python bench/chat_kv_reuse.py                          # the embedded demo model
    python bench/chat_kv_reuse.py --model out/ --turns 3 --max-tokens 48 --repeats 3

Prints a Markdown table (seconds per conversation, best of --repeats) and the speed-up.
"""
from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time
from pathlib import Path

QUESTIONS = ["What is in this image?", "What colours do you see?", "Describe the image in detail.",
             "Is there anything unusual?", "Summarise your answers."]


def sample_image(path: str | None):
    from PIL import Image
    if path:
        return Image.open(path).convert("RGB")
    samples = sorted((Path(__file__).resolve().parents[1] / "llava_local" / "data" / "samples").glob("*.png"))
    if samples:
        return Image.open(samples[0]).convert("RGB")
    import numpy as np
    return Image.fromarray((np.random.default_rng(0).random((336, 336, 3)) * 255).astype("uint8"))


def run_ours(pair, image, turns: int, max_tokens: int, backend: str, threads: int | None):
    from llava_local.runtime.engine import Engine
    eng = Engine(pair, vision_backend=backend, threads=threads)
    try:
        eng.ask("warm-up", [image], max_tokens=1)          # load lazily-initialised kernels
        eng._embed_cache.clear()
        enc0, ev0 = eng.n_images_encoded, eng.llm.n_evaluated
        t0 = time.perf_counter()
        s = eng.chat_session(max_tokens=max_tokens)
        answers = []
        for i in range(turns):
            answers.append(s.ask(QUESTIONS[i % len(QUESTIONS)], [image] if i == 0 else []))
        dt = time.perf_counter() - t0
        stats = {"images_encoded": eng.n_images_encoded - enc0, "positions_evaluated": eng.llm.n_evaluated - ev0,
                 "prompt_tokens_per_turn": [a.n_prompt_tokens for a in answers],
                 "generated": [len(a.tokens) for a in answers], "backend": eng.vision.name}
        return dt, stats
    finally:
        eng.close()


def run_llama_cpp_python(pair, image, turns: int, max_tokens: int, threads: int | None, n_ctx: int):
    from llama_cpp_python_baseline import use_same_cpu_buffers_as_llava_local
    use_same_cpu_buffers_as_llava_local()
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = Llava15ChatHandler(clip_model_path=str(pair.mmproj_path), verbose=False)
    llm = Llama(model_path=str(pair.llm_path), chat_handler=handler, n_ctx=n_ctx, n_threads=threads,
                verbose=False)
    llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "warm-up"}]}], max_tokens=1)
    t0 = time.perf_counter()
    messages = []
    generated = []
    for i in range(turns):
        q = QUESTIONS[i % len(QUESTIONS)]
        content = ([{"type": "image_url", "image_url": {"url": uri}}] if i == 0 else []) + [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
        messages.append({"role": "assistant", "content": out["choices"][0]["message"]["content"]})
        generated.append(out["usage"]["completion_tokens"])
    return time.perf_counter() - t0, {"generated": generated}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or LLM .gguf (default: the embedded demo model)")
    ap.add_argument("--mmproj", default=None)
    ap.add_argument("--image", default=None, help="image file (default: a bundled sample)")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vision-backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from llava_local.runtime.model_source import find_model
    pair = find_model(args.model, args.mmproj)
    image = sample_image(args.image)
    n_ctx = min(4096, pair.n_ctx_train or 4096)
    ours, theirs = [], []
    for _ in range(args.repeats):
        dt, stats = run_ours(pair, image, args.turns, args.max_tokens, args.vision_backend, args.threads)
        ours.append(dt)
        dt2, stats2 = run_llama_cpp_python(pair, image, args.turns, args.max_tokens, args.threads, n_ctx)
        theirs.append(dt2)
    best_ours, best_theirs = min(ours), min(theirs)
    print(f"model: {pair.llm_path.name} + {pair.mmproj_path.name}; {args.turns} turns, "
          f"max {args.max_tokens} tokens/answer, best of {args.repeats}")
    print(f"llava-local: images encoded {stats['images_encoded']}, prompt positions per turn "
          f"{stats['prompt_tokens_per_turn']}, generated {stats['generated']} (vision: {stats['backend']})")
    print(f"llama-cpp-python: generated {stats2['generated']}")
    print()
    print("| system | conversation (s) | median (s) |")
    print("|---|---|---|")
    print(f"| llava-local chat session | {best_ours:.3f} | {statistics.median(ours):.3f} |")
    print(f"| llama-cpp-python Llava15ChatHandler | {best_theirs:.3f} | {statistics.median(theirs):.3f} |")
    print(f"\nspeed-up: {best_theirs / best_ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
