"""Where things run: the extra-buffer-types probe (real child processes: one that finishes, one
that dies by SIGILL), the placement resolver behind `-ngl auto` / `--vision-device auto` /
`--vision-backend auto`, and what the CLI, the Python API and caption records say about it.

This machine's llama-cpp-python is a CPU build: `auto` must resolve to 0 GPU layers and say why.
The GPU half is checked by `make gpu-check` on a GPU machine.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llava_local.runtime import extra_bufts_probe as probe_mod
from llava_local.errors import BackendUnavailableError
from llava_local.runtime.placement import GpuInfo, fit_gpu_layers, parse_gpu_layers, resolve_placement

DEMO = Path(__file__).resolve().parents[1] / "llava_local" / "data" / "demo"
SAMPLE = Path(__file__).resolve().parents[1] / "llava_local" / "data" / "samples" / "shapes-1.png"
SIGILL_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]


# --- the probe ------------------------------------------------------------------------------------

def _child(monkeypatch, cmd: list[str]) -> None:
    monkeypatch.setattr(probe_mod, "child_command", lambda: cmd)


def _cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "llava-local" / probe_mod.CACHE_FILE


def test_probe_child_decodes_quantized_models_with_extra_buffer_types(tmp_path, monkeypatch):
    """The real child: writes Q4_0 and Q8_0 models, loads them with extra buffer types, decodes a batch."""
    cache = _cache(tmp_path, monkeypatch)
    r = probe_mod.probe()
    assert (r.ok, r.outcome, r.cached) == (True, "ok", False)
    assert json.loads(cache.read_text()) == {probe_mod.probe_key(): "ok"}
    _child(monkeypatch, SIGILL_CHILD)
    again = probe_mod.probe()                                 # cached: the child is not run again
    assert (again.ok, again.outcome, again.cached) == (True, "ok", True)


def test_probe_child_killed_by_sigill_turns_extra_buffer_types_off(tmp_path, monkeypatch):
    cache = _cache(tmp_path, monkeypatch)
    monkeypatch.delenv(probe_mod.ENV, raising=False)
    _child(monkeypatch, SIGILL_CHILD)
    r = probe_mod.probe()
    assert (r.ok, r.outcome) == (False, signal.Signals.SIGILL.name)
    cached = json.loads(cache.read_text())
    assert cached == {probe_mod.probe_key(): "SIGILL"}
    # every later load in a new process reads that verdict: LlamaLLM loads with the buffer types off
    monkeypatch.setattr(probe_mod, "_verdict", None)
    from llava_local.runtime.llm import LlamaLLM
    llm = LlamaLLM(next(DEMO.glob("*-llm-*.gguf")), n_ctx=64, n_threads=1)
    try:
        assert llm.extra_bufts is False
    finally:
        llm.close()
        monkeypatch.setattr(probe_mod, "_verdict", None)
    monkeypatch.setenv(probe_mod.ENV, "1")                       # the variable overrides the verdict
    assert probe_mod.extra_buffer_types_allowed() is True


def test_probe_child_that_fails_without_a_signal_is_not_cached(tmp_path, monkeypatch):
    cache = _cache(tmp_path, monkeypatch)
    _child(monkeypatch, [sys.executable, "-c", "import sys; sys.exit('broken install')"])
    r = probe_mod.probe()
    assert r.ok and r.outcome.startswith("error: exit status 1") and "broken install" in r.outcome
    assert not cache.exists()


# --- the resolver ---------------------------------------------------------------------------------

def test_auto_on_a_cpu_build_is_zero_layers_with_the_reason(pair_f32):
    p = resolve_placement(pair_f32, n_ctx=512, workload="oneshot")
    assert p.gpu is None and p.gpu_layers == 0 and p.llm_device == "cpu"
    assert any("no GPU backend" in r for r in p.reasons), p.reasons
    assert (p.vision_backend, p.vision_device) == ("native", "cpu")      # one-shot: no torch import
    assert "LLM on cpu" in p.describe()
    s = resolve_placement(pair_f32, n_ctx=512, workload="session")
    assert s.vision_backend == "torch"                                   # long-lived: the faster CPU kernels
    asked = resolve_placement(pair_f32, gpu_layers=5, n_ctx=512)      # kept on a GPU build; said here
    assert asked.gpu_layers == 0 and any("--gpu-layers 5 asked" in r for r in asked.reasons)


def test_auto_never_falls_back_to_mtmd(pair_f32, monkeypatch):
    import llava_local.runtime.placement as pl
    monkeypatch.setattr(pl, "backend_available", lambda name, pair: f"{name} broken here")
    with pytest.raises(BackendUnavailableError) as e:
        resolve_placement(pair_f32, n_ctx=512)
    msg = str(e.value)
    assert "native: native broken here" in msg and "torch: torch broken here" in msg
    assert "--vision-backend mtmd" in msg and "not exact" in msg
    named = resolve_placement(pair_f32, vision_backend="mtmd", n_ctx=512)   # on request it is fine
    assert named.vision_backend == "mtmd"


def test_gpu_layer_fitting_from_the_gguf_sizes(pair_f32):
    n_layer = int(pair_f32.llm.get("llama.block_count"))
    roomy = GpuInfo("Big GPU", 80 << 30, 80 << 30)
    n, why = fit_gpu_layers(pair_f32, roomy, 4096, vision_on_gpu=True)
    assert n == n_layer + 1 and "all" in why
    tiny = GpuInfo("Small GPU", 768 << 20, 1 << 30)                      # all of it is headroom
    n, why = fit_gpu_layers(pair_f32, tiny, 4096, vision_on_gpu=True)
    assert n == 0 and f"0 of {n_layer}" in why
    assert parse_gpu_layers("auto") == "auto" and parse_gpu_layers("all") == "all"
    assert parse_gpu_layers("12") == 12 and parse_gpu_layers(-1) == "all"


# --- what users see -------------------------------------------------------------------------------

def test_chat_help_shows_auto_defaults():
    from llava_local.cli.main import main
    out = CliRunner().invoke(main, ["chat", "--help"]).output
    flat = " ".join(out.split())
    assert "-ngl, --gpu-layers AUTO|ALL|N" in flat and "number. [default: auto]" in flat
    assert "--vision-device [auto|cpu|gpu]" in flat and "can use it. [default: auto]" in flat


def test_verbose_chat_says_where_things_run_and_why():
    """A real process (logging goes to its stderr): the demo model, one question, --verbose."""
    import subprocess
    p = subprocess.run([sys.executable, "-m", "llava_local.cli.main", "chat", "-v", "--threads", "1", "--max-tokens", "4",
                        "-p", "Describe this picture.", str(SAMPLE)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "LLM on cpu, vision encoder native on cpu" in p.stderr
    assert "no GPU backend (llama_supports_gpu_offload() is false)" in p.stderr
    assert p.stdout.strip()


def test_python_api_and_caption_jobs_resolve_auto_before_the_fingerprint():
    import llava_local
    from llava_local.caption.job import caption_config
    from llava_local.caption.worker import WorkerConfig, resolve_worker
    with llava_local.load(threads=1) as m:
        assert m.engine.placement.gpu_layers == 0 and m.engine.placement.vision_device == "cpu"
        assert m.engine.vision.name == m.engine.placement.vision_backend == "torch"   # a session, on a CPU
    llm, mmproj = next(DEMO.glob("*-llm-*.gguf")), next(DEMO.glob("*-mmproj-*.gguf"))
    auto = WorkerConfig(str(llm), str(mmproj), "Describe this picture.", max_tokens=4, parallel=4)
    assert (auto.engine.vision_backend, auto.engine.vision_device, auto.engine.gpu_layers) == ("auto", "auto", "auto")
    w = resolve_worker(auto)
    assert (w.engine.vision_backend, w.engine.vision_device, w.engine.gpu_layers) == ("torch", "cpu", 0)
    cfg = caption_config(w)
    assert (cfg.vision_backend, cfg.vision_device, cfg.llm_device) == ("torch", "cpu", "cpu")
    # what ran decides the fingerprint: the same job on the GPU, or with native, is another job
    from dataclasses import replace
    for change in (dict(vision_device="gpu"), dict(vision_backend="native"), dict(gpu_layers=33)):
        assert caption_config(replace(w, engine=replace(w.engine, **change))).fingerprint() != cfg.fingerprint()


def test_gpu_bisect_runs_its_variants_in_separate_processes(tmp_path):
    """bench/gpu_bisect.py must stay ready to run on a GPU machine: here (CPU build) a subset."""
    import subprocess
    out = tmp_path / "bisect.json"
    p = subprocess.run([sys.executable, "bench/gpu_bisect.py", "--only", "ngl 0", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    names = [r["variant"] for r in res["results"]]
    assert names == ["raw, llama.cpp defaults, ngl 0", "raw + extra_bufts off, ngl 0", "raw + numpy first, ngl 0",
                     "LlamaLLM (as shipped), ngl 0"]
    assert all(r["status"] == "exit 0" and r["last_step"] == "done" for r in res["results"])
    assert res["gpu_offload"] is False
