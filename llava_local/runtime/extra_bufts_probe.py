"""Can llama.cpp's extra CPU buffer types run on this CPU? Asked once per CPU model and llama.cpp build.

llama.cpp's extra CPU buffer types repack quantized weights for faster kernels (AVX2/AVX-512/NEON
interleaving, Intel AMX tiles). Some virtual machines advertise AMX in /proc/cpuinfo without enabling
the tile instructions for guests: llama.cpp then dies with SIGILL on the first multi-token batch of a
quantized model. No flag tells the two apart, so we ask the CPU: a child process writes a tiny Q4_0
and Q8_0 model, loads each with the extra buffer types on and decodes a multi-token batch. Its
verdict is cached in the user cache dir, keyed by CPU model and llama.cpp build:

    ok        the child finished: extra buffer types stay on (llama.cpp's default)
    SIGILL    (or any other signal) the child died: extra buffer types off for this CPU and build

A child that fails with an ordinary error (e.g. a broken install) says nothing about the CPU: nothing
is cached and the buffer types stay on. LLAVA_LOCAL_EXTRA_BUFTS=0/1 overrides the probe.

    python -m llava_local.runtime.extra_bufts_probe          # run the probe now and print its verdict
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from llava_local.fileio import atomic_write

log = logging.getLogger(__name__)

ENV = "LLAVA_LOCAL_EXTRA_BUFTS"
CACHE_FILE = "extra-bufts-probe.json"
PROBE_TIMEOUT_S = 120.0
_lock = threading.Lock()
_verdict: bool | None = None      # this process's answer, once known


@dataclass(frozen=True)
class ProbeResult:
    ok: bool                      # extra buffer types may be used
    outcome: str                  # "ok", a signal name ("SIGILL"), or "error: ..." (not cached)
    cached: bool = False          # read from the cache, not run now


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llava-local"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            text = f.read(1 << 20)
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags")), "")
        # the flags matter too: the same model name can come with AMX enabled or not
        return f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:12]}"
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"


def _llama_build() -> str:
    """The llama.cpp build: llama-cpp-python's version and the identity of its shared libraries."""
    import llama_cpp
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    parts = [getattr(llama_cpp, "__version__", "?")]
    for p in sorted(lib_dir.glob("*ggml*")) + sorted(lib_dir.glob("*llama*")):
        try:
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def probe_key() -> str:
    return f"{_cpu_model()}|{_llama_build()}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, outcome: str) -> None:
    data = _read_cache(path)
    data[key] = outcome
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))
    except OSError as exc:  # a read-only home: probe again next time, never fail the load
        log.debug("cannot cache the extra buffer types probe in %s: %s", path, exc)


def child_command() -> list[str]:
    return [sys.executable, "-m", "llava_local.runtime.extra_bufts_probe", "--child"]


def run_probe(*, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run the child (this module with --child) and judge how it ended. Not cached."""
    try:
        proc = subprocess.run(child_command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ProbeResult(True, f"error: no answer in {timeout:.0f} s")
    except OSError as exc:
        return ProbeResult(True, f"error: {exc}")
    if proc.returncode == 0:
        return ProbeResult(True, "ok")
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return ProbeResult(False, name)
    tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    return ProbeResult(True, f"error: exit status {proc.returncode}: {tail[0]}")


def probe() -> ProbeResult:
    """The cached verdict for this CPU and llama.cpp build, running the child when there is none."""
    path = cache_dir() / CACHE_FILE
    key = probe_key()
    known = _read_cache(path).get(key)
    if isinstance(known, str):
        return ProbeResult(known == "ok", known, cached=True)
    result = run_probe()
    if result.outcome.startswith("error"):
        log.warning("extra buffer types probe failed (%s); keeping llama.cpp's default", result.outcome)
    else:
        _write_cache(path, key, result.outcome)
        if not result.ok:
            log.warning("llama.cpp's extra CPU buffer types crash on this CPU (probe died with %s): "
                        "weight repacking off (set %s=1 to force it)", result.outcome, ENV)
    return result


def extra_buffer_types_allowed() -> bool:
    """LLAVA_LOCAL_EXTRA_BUFTS=0/1, else the probe's verdict (once per process)."""
    global _verdict
    env = os.environ.get(ENV)
    if env in ("0", "1"):
        return env == "1"
    with _lock:
        if _verdict is None:
            _verdict = probe().ok
        return _verdict


# --------------------------------------------------------------------------------------------------
# The child: a tiny quantized llama, loaded with extra buffer types, one multi-token batch decoded
# --------------------------------------------------------------------------------------------------

def write_probe_model(path: Path, qtype_name: str) -> None:
    """A 1-layer llama with no vocabulary (token ids in, logits out), weights quantized to `qtype_name`.
    Widths are multiples of 256 so every repacking and AMX kernel accepts the tensors."""
    import gguf
    import numpy as np
    rng = np.random.default_rng(0)
    n_embd, n_ff, n_vocab, n_head = 256, 512, 256, 4
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("none")

    def add(name: str, shape: tuple[int, ...], quantize: bool) -> None:
        data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if quantize:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", (n_vocab, n_embd), False)
    add("output_norm.weight", (n_embd,), False)
    add("output.weight", (n_vocab, n_embd), True)
    add("blk.0.attn_norm.weight", (n_embd,), False)
    add("blk.0.ffn_norm.weight", (n_embd,), False)
    for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
        add(f"blk.0.{t}.weight", (n_embd, n_embd), True)
    add("blk.0.ffn_gate.weight", (n_ff, n_embd), True)
    add("blk.0.ffn_up.weight", (n_ff, n_embd), True)
    add("blk.0.ffn_down.weight", (n_embd, n_ff), True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _child() -> int:
    from llava_local.errors import LlavaLocalError
    from llava_local.runtime.llm import LlamaLLM
    with tempfile.TemporaryDirectory(prefix="llava-local-probe-") as tmp:
        for qtype in ("Q4_0", "Q8_0"):
            path = Path(tmp) / f"probe-{qtype}.gguf"
            write_probe_model(path, qtype)
            try:   # on the CPU (the question is about it), extra buffer types asked for explicitly
                llm = LlamaLLM(path, n_ctx=64, n_batch=32, n_gpu_layers=0, extra_bufts=True)
            except LlavaLocalError as exc:
                print(f"the {qtype} probe model: {exc}", file=sys.stderr)
                return 2
            try:   # a multi-token batch: the repacked GEMM path, where SIGILL was seen
                llm.eval_tokens([(i * 7) % 256 for i in range(32)])
            except LlavaLocalError as exc:
                print(f"the {qtype} probe model: {exc}", file=sys.stderr)
                return 3
            finally:
                llm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child()
    r = run_probe()
    print(f"extra buffer types: {'on' if r.ok else 'off'} (probe: {r.outcome}; key {probe_key()})")
    if not r.outcome.startswith("error"):
        _write_cache(cache_dir() / CACHE_FILE, probe_key(), r.outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
