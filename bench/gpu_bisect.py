"""Pin down a crash at LLM load: one subprocess per variant, each toggling one suspect.

On an H200 (CUDA 13) every path that loaded the LLM through the old `LlamaLLM` died with SIGSEGV
inside `llama_model_load_from_file` (with 0 GPU layers too), while llama-cpp-python's own `Llama`
loaded the same file. What the old LlamaLLM did differently: `use_extra_bufts` off where
/proc/cpuinfo advertises AMX, its own llama.cpp/libmtmd log callbacks, and (through the engine)
PyTorch or our native vision library loaded in the same process. Each variant below loads the
model, creates a context and decodes a few tokens, in a fresh `python -X faulthandler` process, and
the table says how each ended (exit status or signal, and the last step reached):

    python bench/gpu_bisect.py                          # the embedded demo model's LLM
    python bench/gpu_bisect.py --model llm.gguf --mmproj mmproj.gguf --json out.json

Exit status 0 when every variant finished, 1 otherwise. Runs on a CPU build too (the GPU variants
then offload nothing), so the script is exercised by the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "llava_local" / "data" / "demo"
ALL = 999   # more than any model's layers: llama.cpp offloads all of them and the output layer

# name -> child options; one suspect changes at a time against the plain llama.cpp baseline
VARIANTS: dict[str, dict] = {
    "raw, llama.cpp defaults, ngl 0": dict(via="raw", ngl=0),
    "raw, llama.cpp defaults, ngl all": dict(via="raw", ngl=ALL),
    "raw + our log callbacks, ngl all": dict(via="raw", ngl=ALL, callbacks=True),
    "raw + extra_bufts off, ngl 0": dict(via="raw", ngl=0, extra_bufts="off"),
    "raw + extra_bufts off, ngl all": dict(via="raw", ngl=ALL, extra_bufts="off"),
    "raw + callbacks + extra_bufts off (old LlamaLLM), ngl all": dict(via="raw", ngl=ALL, callbacks=True,
                                                                      extra_bufts="off"),
    "raw + torch imported first, ngl all": dict(via="raw", ngl=ALL, torch_first=True),
    "raw + native vision library loaded first, ngl all": dict(via="raw", ngl=ALL, native_first=True),
    "raw + numpy imported first, ngl all": dict(via="raw", ngl=ALL, numpy_first=True),
    "raw, llama_cpp before torch, ngl all": dict(via="raw", ngl=ALL, llama_first=True, torch_first=True),
    "LlamaLLM, llama_cpp imported first, ngl all": dict(via="llamallm", ngl=ALL, llama_first=True),
    # what in numpy's import breaks the later model load: its OpenBLAS threads? with no layer offloaded too?
    "raw + numpy first, OPENBLAS_NUM_THREADS=1, ngl all": dict(via="raw", ngl=ALL, numpy_first=True,
                                                               env={"OPENBLAS_NUM_THREADS": "1"}),
    "raw + numpy first, ngl 0": dict(via="raw", ngl=0, numpy_first=True),
    "LlamaLLM (as shipped), ngl 0": dict(via="llamallm", ngl=0),
    "LlamaLLM (as shipped), ngl all": dict(via="llamallm", ngl=ALL),
    "llava_local.load (auto placement)": dict(via="load"),
    "llama_cpp.Llama (control), ngl all": dict(via="llama", ngl=ALL),
}


def _step(name: str) -> None:
    print(f"STEP {name}", flush=True)


def _decode_some(L, model) -> None:
    """A context of llama.cpp's defaults (n_ctx 512) and one 8-token batch."""
    cp = L.llama_context_default_params()
    cp.n_ctx = 512
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama_init_from_model returned NULL")
    _step("context")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    n = 8
    batch = L.llama_batch_init(n, 0, 1)
    batch.n_tokens = n
    for i in range(n):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = (i * 13 + 1) % max(n_vocab, 2), i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1 if i == n - 1 else 0
    rc = L.llama_decode(ctx, batch)
    L.llama_batch_free(batch)
    if rc != 0:
        raise SystemExit(f"llama_decode returned {rc}")
    _step("decode")
    L.llama_free(ctx)


def child(opts: dict, model: str, mmproj: str) -> None:
    if opts.get("llama_first"):             # llama.cpp's libraries loaded before any other native library
        import llama_cpp  # noqa: F401
        _step("llama_cpp imported")
    if opts.get("numpy_first"):
        import numpy  # noqa: F401
        _step("numpy imported")
    if opts.get("torch_first"):
        import torch
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")   # initialise CUDA in this process, as the torch backend would
        _step(f"torch {torch.__version__} (cuda {torch.cuda.is_available()})")
    if opts.get("native_first"):
        from llava_local.formats.mmproj import read_mmproj
        from llava_local.vision import VisionOptions, create_backend
        create_backend("native", read_mmproj(mmproj), VisionOptions(device="gpu"))
        _step("native encoder created")
    via = opts["via"]
    if via == "raw":
        import llama_cpp as L
        L.llama_backend_init()
        _step("backend_init")
        if opts.get("callbacks"):
            from llava_local.llama_lib import llama_cpp_lib
            llama_cpp_lib(verbose=False)      # installs our llama.cpp and libmtmd log callbacks
            _step("log callbacks")
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = opts["ngl"]
        if opts.get("extra_bufts") == "off":
            mp.use_extra_bufts = False
        model_p = L.llama_model_load_from_file(model.encode(), mp)
        if not model_p:
            raise SystemExit("llama_model_load_from_file returned NULL")
        _step("model loaded")
        _decode_some(L, model_p)
        L.llama_model_free(model_p)
    elif via == "llamallm":
        from llava_local.runtime.llm import LlamaLLM
        llm = LlamaLLM(model, n_ctx=512, n_gpu_layers=opts["ngl"])
        _step(f"model loaded (extra_bufts {llm.extra_bufts})")
        llm.eval_tokens(llm.tokenize("USER: hello ASSISTANT:"))
        _step("decode")
        llm.close()
    elif via == "load":
        import llava_local
        m = llava_local.load(model if Path(model).is_dir() else model, None if Path(model).is_dir() else mmproj)
        _step("loaded: " + m.engine.placement.describe())
        image = sorted((REPO / "llava_local" / "data" / "samples").glob("*.png"))[0]
        _step("answer: " + m.ask(str(image), "Describe this picture.", max_tokens=16).replace("\n", " "))
        m.close()
    elif via == "llama":
        from llama_cpp import Llama
        llm = Llama(model_path=model, n_gpu_layers=-1 if opts["ngl"] == ALL else opts["ngl"], n_ctx=512,
                    verbose=False)
        _step("model loaded")
        llm.eval(llm.tokenize(b"USER: hello ASSISTANT:"))
        _step("decode")
    _step("done")


def run_variant(name: str, opts: dict, model: str, mmproj: str, timeout: float) -> dict:
    cmd = [sys.executable, "-X", "faulthandler", __file__, "--child", json.dumps(opts), "--model", model,
           "--mmproj", mmproj]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                           env={**os.environ, **opts.get("env", {})})
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = None, exc.stdout or "", exc.stderr or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
    steps = [ln[5:] for ln in out.splitlines() if ln.startswith("STEP ")]
    from llava_local.procs import signal_name   # here: a child imports nothing it does not test
    status = "timeout" if rc is None else signal_name(rc).replace("exit status", "exit")   # "exit 0", "SIGSEGV"
    return {"variant": name, "status": status, "ok": rc == 0, "last_step": steps[-1] if steps else "(none)",
            "steps": steps, "seconds": round(time.perf_counter() - t0, 2),
            "stderr_tail": err.strip().splitlines()[-12:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="LLM .gguf (default: the embedded demo model's)")
    ap.add_argument("--mmproj", default=None, help="mmproj .gguf (default: the demo model's)")
    ap.add_argument("--only", default=None, help="run the variants whose name contains this text")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per variant")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    model = a.model or str(next(DEMO.glob("*-llm-*.gguf")))
    mmproj = a.mmproj or str(next(DEMO.glob("*-mmproj-*.gguf")))
    if a.child is not None:
        child(json.loads(a.child), model, mmproj)
        return 0
    import llama_cpp
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    print(f"llama-cpp-python {llama_cpp.__version__}, GPU offload {'supported' if gpu else 'NOT supported (CPU build)'}; "
          f"model {model}")
    results = []
    for name, opts in VARIANTS.items():
        if a.only and a.only not in name:
            continue
        r = run_variant(name, opts, model, mmproj, a.timeout)
        results.append(r)
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['status']:<8} {r['seconds']:6.1f}s  {name}  [last step: {r['last_step']}]",
              flush=True)
        if not r["ok"]:
            for ln in r["stderr_tail"]:
                print("      | " + ln)
    if a.json:
        Path(a.json).write_text(json.dumps({"gpu_offload": gpu, "model": model, "results": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
