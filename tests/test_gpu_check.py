"""`make gpu-check` cannot rot on machines without a GPU: bench/gpu_check.py --tiny runs its CPU half
(every code path of the GPU checks, on tiny models) and reports each GPU check as SKIP with the
reason, or runs it where there is a GPU; a check whose process dies is a FAIL naming the signal; and
the EOS suppression its throughput check relies on (BatchDecoder ignore_eos) works.

    .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_CHECKS = ["cpu.build", "cpu.demo", "cpu.llm-top1", "cpu.vision-parity.native.F32", "cpu.vision-parity.native.F16",
              "cpu.caption-throughput.F16", "cpu.encoder-throughput", "cpu.chat", "cpu.serve", "cpu.train.stage1",
              "cpu.train.stage2-lora"]
GPU_CHECKS = ["gpu.build", "gpu.demo", "gpu.llm-top1", "gpu.vision-parity", "gpu.caption-throughput",
              "gpu.encoder-throughput", "gpu.chat", "gpu.serve", "gpu.train"]
LINE = re.compile(r"^(PASS|FAIL|SKIP) ([\w.-]+): (.+)$")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-check")
    out = work / "figures.json"
    # models go to gpu_check's model cache (.cache/gpu-check: rebuilt when their spec or code changes)
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--work-dir", str(work), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [LINE.match(x) for x in proc.stdout.splitlines()]
    assert all(lines), proc.stdout                           # nothing but result lines on stdout
    return proc, {m[2]: (m[1], m[3]) for m in lines}, json.loads(out.read_text())


def test_cpu_half_passes_and_gpu_checks_skip_with_a_reason(tiny_run):
    proc, res, figures = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for name in CPU_CHECKS:
        assert res.get(name, ("missing",))[0] == "PASS", (name, res.get(name), proc.stderr[-3000:])
    gpu = figures["machine"]["llama_gpu"] or figures["machine"]["torch_cuda"]
    for name in GPU_CHECKS:
        got = [(n, s) for n, s in res.items() if n == name or n.startswith(name + ".")]
        assert got, (name, sorted(res))
        if not gpu:
            assert got == [(name, res[name])] and res[name][0] == "SKIP", got
            assert "llama_supports_gpu_offload() is False" in res[name][1] or "torch.cuda" in res[name][1]
        else:
            assert all(s[0] in ("PASS", "SKIP") for _, s in got), got


def test_figures_come_back_as_json(tiny_run):
    proc, res, figures = tiny_run
    assert [r["check"] for r in figures["results"]] == list(res)
    by = {r["check"]: r for r in figures["results"]}
    top1 = by["cpu.llm-top1"]["data"]
    assert top1["positions"] >= 32 and top1["agree"] >= 0.95 * top1["positions"]
    assert by["cpu.vision-parity.native.F32"]["data"]["min_cosine"] >= 0.9999
    caption = by["cpu.caption-throughput.F16"]["data"]["rows"]
    # EOS ignored on both sides: every image got its 32 tokens (the handler may run up to 3 past
    # max_tokens to finish a UTF-8 character)
    assert [r["tokens_per_caption"] for r in caption[:-1]] == [32.0] * (len(caption) - 1)
    assert caption[-1]["system"] == "llama-cpp-python Llava15ChatHandler loop"
    assert 32.0 <= caption[-1]["tokens_per_caption"] <= 35.0
    assert by["cpu.chat"]["data"]["images_encoded"] == 1
    assert len(by["cpu.train.stage1"]["data"]["cpu"]) == 5
    assert set(figures["check_seconds"]) >= {"cpu.build", "cpu.demo", "cpu.train"}


def test_crashing_check_fails_with_its_signal_and_the_rest_still_run(tmp_path, monkeypatch):
    """A check whose process dies (SIGSEGV in llama.cpp on CUDA has been seen) is a FAIL naming the
    signal; the checks after it run in a fresh process."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check
    monkeypatch.setenv("_GPU_CHECK_TEST_CRASH", "cpu.demo")
    env = {"tiny": True, "work_dir": str(tmp_path), "model_dir": str(gpu_check.MODEL_DIR), "threads": 1,
           "llm_layers": 1, "images": 1, "check_timeout": 60}
    items = list(gpu_check.run_children(["cpu.demo", "cpu.build"], env, tmp_path, 120))
    results = [(r.status, r.check, r.figure) for r in items if isinstance(r, gpu_check.Result)]
    assert results[0] == ("FAIL", "cpu.demo", "its process died (SIGSEGV)")
    assert results[1][:2] == ("PASS", "cpu.build")


def test_ignore_eos_runs_answers_to_max_tokens():
    """What the throughput check's `caption` side relies on (WorkerConfig.ignore_eos ->
    BatchDecoder): the demo model ends its answer with EOS; with ignore_eos the same answer goes on
    to max_tokens and no end-of-generation token is ever sampled."""
    from PIL import Image

    from llava_local.runtime.batch_decode import BatchDecoder, SeqRequest
    from llava_local.runtime.chat_session import user_content
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.model_pair import resolve_pair
    from llava_local.runtime.model_source import demo_model_dir
    from llava_local.runtime.sampling import Sampler, SamplingParams
    from llava_local.prompts.templates import IMAGE_MARKER, Message
    eng = Engine(resolve_pair(demo_model_dir()), vision_backend="native", n_ctx=2048, n_seq_max=2, threads=1)
    try:
        text = eng.format.render([Message("user", user_content("Describe this picture.", 1))],
                                 add_generation_prompt=True)
        before, after = text.split(IMAGE_MARKER)
        image = Image.open(REPO / "llava_local" / "data" / "samples" / "shapes-1.png").convert("RGB")
        emb = eng.encode_images([image])[0]

        def answer(ignore_eos: bool):
            dec = BatchDecoder(eng.llm, eng.llm.tokenize(before), n_seq=2, ignore_eos=ignore_eos)
            req = SeqRequest("a", [emb, eng.llm.tokenize(after)], Sampler(SamplingParams()), 120)
            return dec.generate([req])[0]
        stop, full = answer(False), answer(True)
        eog = [t for t in full.tokens if eng.llm.is_eog(t)]
    finally:
        eng.close()
    assert stop.finish_reason == "stop" and 0 < len(stop.tokens) < 120, stop
    assert full.finish_reason == "length" and len(full.tokens) == 120 and not eog
    assert full.tokens[:len(stop.tokens)] == stop.tokens          # the same answer, continued past its end
