"""The embedded shapes demo model: within the repo's size budget, loads on llama.cpp, answers
held-out questions; and the build pipeline end to end at toy scale.

    .venv/bin/python -m pytest -q tests/test_train_demo.py
    python bench/eval_shapes.py          # the full figure (500 held-out questions)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llava_local.formats.gguf_check import read_gguf_info
from llava_local.scoring import exact_match
from train.shapes import eval_records, write_eval_images

from train_helpers import no_weight_repacking  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "llava_local" / "data" / "demo"
SAMPLES = REPO / "llava_local" / "data" / "samples"


def test_demo_files_fit_the_repo_budget():
    files = [p for p in list(DEMO.iterdir()) + list(SAMPLES.iterdir()) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= 20e6, f"{total / 1e6:.1f} MB"
    (manifest_path,) = DEMO.glob("*.manifest.json")
    m = json.loads(manifest_path.read_text())
    assert (DEMO / m["llm"]).is_file() and (DEMO / m["mmproj"]).is_file()
    assert read_gguf_info(DEMO / m["llm"]).metadata["general.file_type"] == 7      # Q8_0
    assert m["template"] == "vicuna_v1" and m["shapes_eval"]["n_images"] >= 60
    assert 3 <= len(list(SAMPLES.glob("*.png"))) <= 4


def test_demo_model_answers_held_out_questions(tmp_path, no_weight_repacking):
    """The shipped demo model answers through llama.cpp in the shapes language (short canonical
    answers) and reads the image: on 12 held-out images it gets every global fact right (background
    colour, total count: 100 % in bench/eval_shapes.py) and finds particular shapes far above what the
    question alone allows (the colour of "the star", the shape of "the green one": one of 4-6 answers;
    the shipped model gets 11 of 16 here). Its full accuracy is measured by bench/eval_shapes.py
    (README): below the issue's 90 % target."""
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.model_pair import resolve_pair
    from llava_local.runtime.sampling import SamplingParams
    records = eval_records(12, seed=0)               # 12 held-out images, every kind
    write_eval_images(records, tmp_path)
    engine = Engine(resolve_pair(DEMO), vision_backend="torch", n_ctx=512)
    try:
        answers = [engine.ask(r["question"], [tmp_path / r["image"]], max_tokens=12,
                              sampling=SamplingParams(temperature=0.0)).text for r in records]
    finally:
        engine.close()
    right = [exact_match(a, r["answer"]) for a, r in zip(answers, records)]
    print(f"demo model: {sum(right)}/{len(right)} exact on 12 held-out images")
    assert all(a and a.endswith(".") and len(a.split()) <= 4 for a in answers), answers
    global_questions = [ok for r, ok in zip(records, right)
                        if r["question"].endswith("the background?") or r["question"].startswith("How many shapes")]
    assert len(global_questions) >= 6 and all(global_questions)
    lookups = [ok for r, ok in zip(records, right) if r["kind"] in ("colour", "shape")
               and not r["question"].endswith("the background?")]
    print(f"lookups (colour/shape of a particular shape): {sum(lookups)}/{len(lookups)}")
    assert len(lookups) >= 12 and sum(lookups) >= 0.6 * len(lookups), f"{sum(lookups)}/{len(lookups)}"


def test_demo_build_pipeline_at_toy_scale(tmp_path, no_weight_repacking):
    """Every step of train/demo_model.py (tokenizer, data, CLIP, warm-up, stages 1-2, convert, quantize)."""
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.model_pair import resolve_pair
    from train.clip_pretrain import ClipConfig
    from train.demo_model import DemoConfig, build
    cfg = DemoConfig(n_train=32, n_eval=2, n_text=16, min_turns=2, max_turns=3,
                     clip=ClipConfig(steps=2, batch_size=16, hidden_size=32, layers=3, heads=2, embed_dim=32),
                     llm_hidden=64, llm_layers=1, llm_heads=2, llm_kv_heads=1, llm_ffn=128,
                     batch_size=16, micro_batch_size=16)
    report = build(tmp_path / "out", tmp_path / "work", tmp_path / "samples", cfg)
    assert set(report["steps"]) == {"data", "clip", "warmup", "stage1", "stage2", "package"}
    pair = resolve_pair(tmp_path / "out")
    assert pair.llm.metadata["general.file_type"] == 7 and pair.image_tokens == 4
    vocab = json.loads((tmp_path / "work" / "stage2" / "output_vocab.json").read_text())["ids"]
    assert 50 < len(vocab) < 300
    # its own byte-level BPE: a few hundred tokens, and llama.cpp splits text exactly as training did
    from convert.tokenizer_gguf import CHECK_TEXT
    from llava_local.runtime.llm import LlamaLLM
    from train.tokenizer import load_tokenizer
    tok = load_tokenizer(tmp_path / "work" / "stage2")
    assert 256 < len(tok.hf) <= cfg.vocab_size and pair.llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    texts = [CHECK_TEXT, "What shape is at the top left? A red circle.", "How many stars are there?\n 12 345",
             "Ünïcödé 🦙 stays encodable, byte by byte"]
    llm = LlamaLLM(pair.llm_path, n_ctx=256)
    try:
        for text in texts:
            assert llm.tokenize(text, parse_special=False) == tok.encode(text), text
            assert llm.detokenize(tok.encode(text)) == text
        assert (llm.bos, llm.eos) == (tok.bos_id, tok.eos_id)      # no BOS in prompts, on both sides
    finally:
        llm.close()
    engine = Engine(pair, vision_backend="torch", n_ctx=512)
    try:
        ans = engine.ask("How many shapes are there?", [next((tmp_path / "samples").glob("*.png"))], max_tokens=4)
    finally:
        engine.close()
    assert ans.tokens and all(t in vocab for t in ans.tokens)     # only the shapes language is ever emitted


@pytest.mark.parametrize("argv, needle", [
    (["-m", "train.demo_model", "--set", "no_such_field=1"], "no_such_field"),
    (["-m", "train.demo_model", "--set", "stage2_epochs=abc"], "stage2_epochs=abc"),
    (["-m", "train.clip_pretrain", "--scenes", "/no/such/scenes.json", "--out", "x"], "/no/such/scenes.json"),
])
def test_build_scripts_refuse_bad_arguments_in_one_line(tmp_path, argv, needle):
    import subprocess
    res = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [ln for ln in res.stderr.splitlines() if ": error: " in ln]     # after argparse's usage lines
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(errors) == 1 and needle in errors[0] and res.stderr.rstrip().endswith(errors[0]), res.stderr
