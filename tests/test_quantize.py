"""Quantization: every LLM type loads and answers; Q8_0 tracks F16 on teacher-forced tokens; the
mmproj's Q8_0 loads in libmtmd and in the torch backend; `quantize`, `convert --quantize` and
`eval-quant` through the CLI, with bad input as one `Error:` line.

Models load without llama.cpp's CPU weight repacking (extra_bufts=False, eval-quant --no-repack; see
QuantEvalConfig.repack): where a VM advertises AMX without enabling it, the repacked Q4/Q8 kernels
die with SIGILL.
"""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import assert_one_line_error, IMAGES, cosine_per_token
from llava_local.eval.quant_eval import Case, teacher_forced_case, teacher_forced_top1
from convert.quantize import QTYPES, quantize, quantize_mmproj
from llava_local.cli.main import main
from llava_local.runtime.engine import Engine
from llava_local.formats.gguf_check import read_gguf_info
from llava_local.runtime.llm import LlamaLLM
from llava_local.formats.mmproj import read_mmproj
from llava_local.runtime.model_pair import resolve_pair
from llava_local.image.preprocess import preprocess_batch
from llava_local.runtime.sampling import SamplingParams
from llava_local.vision import VisionOptions, create_backend

GT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def quantized(converted_f32, tmp_path_factory):
    """Every LLM type, quantized from the tiny model's F32 LLM."""
    out = tmp_path_factory.mktemp("quant")
    return {t: quantize(converted_f32.llm_path, out / f"tiny-llm-{t}.gguf", t) for t in QTYPES}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _file_type(path) -> int:
    return int(read_gguf_info(path).require("general.file_type"))


# --- the LLM ---

@pytest.mark.parametrize("qtype", list(QTYPES))
def test_each_type_loads_and_answers(quantized, converted_f32, qtype):
    path = quantized[qtype]
    assert _file_type(path) == getattr(gguf.LlamaFileType, "MOSTLY_" + qtype)
    assert path.stat().st_size < converted_f32.llm_path.stat().st_size
    eng = Engine(resolve_pair(path, converted_f32.mmproj_path), vision_backend="torch", n_ctx=256, threads=1,
                 extra_bufts=False)
    try:
        ans = eng.ask("Describe the image.", [IMAGES[0]], max_tokens=4, sampling=SamplingParams(temperature=0.0))
    finally:
        eng.close()
    assert ans.finish_reason in ("stop", "length") and ans.n_prompt_tokens > 16


QUESTIONS_ANSWERS = [   # what the learned tiny model is taught (one per image of conftest.IMAGES)
    ("What is shown in this image?", "A red circle sits in the top left corner, and a blue square below it."),
    ("Describe the picture.", "Two green triangles and one yellow star on a grey background, near the middle."),
    ("How many shapes are there?", "Three: a purple square at the top, an orange circle and a black star below."),
    ("What do you see?", "Only noise: coloured pixels everywhere, no shapes, no text and no objects to name."),
]


def _cases(pair) -> tuple[list[Case], np.ndarray, np.ndarray]:
    """Teacher-forced cases (training layout), image embeddings and preprocessed pixels of IMAGES."""
    eng = Engine(pair, vision_backend="torch", n_ctx=256, threads=1, extra_bufts=False)
    try:
        cases = [teacher_forced_case(eng, q, a, i) for i, (q, a) in enumerate(QUESTIONS_ANSWERS)]
        for c, (_, a) in zip(cases, QUESTIONS_ANSWERS):   # the targets: the answer, then the end of turn
            assert eng.llm.detokenize(c.target[:-1]).strip() == a and eng.llm.is_eog(c.target[-1])
        return cases, eng.encode_images(IMAGES), preprocess_batch(IMAGES, eng.vision.preprocess_config)
    finally:
        eng.close()


def _top1(llm_paths: dict, mmproj, cases: list[Case], embeds: np.ndarray) -> dict[str, np.ndarray]:
    """Arg-max tokens at every teacher-forced answer position (answer + end of turn), per LLM."""
    out = {}
    for name, path in llm_paths.items():
        eng = Engine(resolve_pair(path, mmproj), vision_backend="torch", n_ctx=256, threads=1, extra_bufts=False)
        try:
            out[name] = np.concatenate([teacher_forced_top1(eng, c, embeds) for c in cases])
        finally:
            eng.close()
    return out


@pytest.fixture(scope="module")
def learned_model(tiny_ckpt, pair_f32, tmp_path_factory):
    """The tiny model after 40 Adam steps on QUESTIONS_ANSWERS (LLM layers only; CLIP, projector and
    embeddings frozen), converted to F32 and quantized to F16 and Q8_0. Its answers are learned, as a
    trained LLaVA's are: the arg-max at an answer position is a preference of the model, not one of
    the near-ties that 49152 random logits put at ~1 % of positions (see the test below)."""
    import copy

    import torch

    from convert import convert
    cases, _, pixels = _cases(pair_f32)
    model = copy.deepcopy(tiny_ckpt[0])
    torch.manual_seed(0)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=torch.from_numpy(pixels))
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        feats = feats.reshape(len(IMAGES), -1, feats.shape[-1])                      # (4, 16, 64)
    table = model.get_input_embeddings()
    params = [p for n, p in model.named_parameters() if "language_model.layers" in n or "language_model.norm" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        loss = 0.0
        for c in cases:
            parts = [table(torch.tensor(it)) if isinstance(it, list) else feats[c.image] for it in c.items if it != []]
            x = torch.cat(parts + [table(torch.tensor(c.target[:-1]))])[None]          # prompt + answer[:-1]
            logits = model(inputs_embeds=x, logits_to_keep=len(c.target)).logits[0]   # (len(answer), vocab)
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(c.target))
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("learned")
    shutil.copytree(tiny_ckpt[1], root / "hf")
    model.eval().save_pretrained(root / "hf")
    res = convert(root / "hf", root / "out", outtype="f32")
    paths = {"F32": res.llm_path}
    paths.update({t: quantize(res.llm_path, root / f"llm-{t}.gguf", t) for t in ("F16", "Q8_0")})
    return resolve_pair(res.llm_path.parent), paths, loss.item()


def test_q8_0_agrees_with_f16_on_teacher_forced_tokens(learned_model, quantized, pair_f32):
    """Q8_0 vs F16 top-1 agreement >= 99 % over the learned tiny model's teacher-forced answers.
    The untrained tiny model's figures are printed too: there, rounding decides the near-ties."""
    pair, paths, loss = learned_model
    cases, embeds, _ = _cases(pair)
    top = _top1(paths, pair.mmproj_path, cases, embeds)
    agree = float((top["Q8_0"] == top["F16"]).mean())
    print(f"\nlearned tiny model (train loss {loss:.3f}): Q8_0 vs F16 top-1 agreement {agree:.1%} over "
          f"{top['F16'].size} teacher-forced tokens (F32 vs F16 {(top['F32'] == top['F16']).mean():.1%})")
    assert agree >= 0.99

    cases, embeds, _ = _cases(pair_f32)
    top = _top1({"F32": pair_f32.llm_path, **{t: quantized[t] for t in ("F16", "Q8_0", "Q4_K_M")}},
                pair_f32.mmproj_path, cases, embeds)
    print(f"untrained tiny model, agreement with F16 over {top['F16'].size} tokens: "
          + ", ".join(f"{t} {(top[t] == top['F16']).mean():.1%}" for t in ("F32", "Q8_0", "Q4_K_M")))
    assert (top["F32"] == top["F16"]).mean() >= 0.95


# --- the mmproj ---

def test_mmproj_q8_0_loads_in_mtmd_and_torch(converted_f32, tmp_path):
    src = converted_f32.mmproj_path
    dst = quantize_mmproj(src, tmp_path / "mmproj-Q8_0.gguf", "Q8_0")
    r = gguf.GGUFReader(dst)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["v.patch_embd.weight"] == GT.F16
    assert types["v.position_embd.weight"] == types["v.class_embd"] == GT.F32
    assert types["mm.0.weight"] == types["v.blk.0.attn_q.weight"] == GT.Q8_0
    assert all(types[t.name] == GT.F32 for t in r.tensors if len(t.shape) == 1)
    assert _file_type(dst) == gguf.LlamaFileType.MOSTLY_Q8_0
    assert r.fields["clip.vision.feature_layer"].contents() == [2]      # metadata copied
    assert dst.stat().st_size < 0.5 * src.stat().st_size
    mm32, mm8 = read_mmproj(src), read_mmproj(dst)

    llm = LlamaLLM(converted_f32.llm_path, n_ctx=128, n_threads=1, extra_bufts=False)
    try:
        for name in ("torch", "mtmd"):
            # each backend against itself at F32 (mtmd's graph differs from the reference by design, #25814)
            ref, q = (create_backend(name, m, VisionOptions(threads=1), llm=llm) for m in (mm32, mm8))
            try:
                a, b = ref.encode(IMAGES), q.encode(IMAGES)
            finally:
                ref.close()
                q.close()
            cos = cosine_per_token(b, a)
            print(f"mmproj Q8_0 vs F32, {name} backend: per-token cosine min {cos.min():.5f} mean {cos.mean():.5f}")
            assert np.isfinite(b).all() and cos.min() >= 0.99
    finally:
        llm.close()


# --- the CLI ---

def test_cli_quantize_llm_and_mmproj(converted_f32, tmp_path):
    res = run_cli("quantize", converted_f32.llm_path, "-o", tmp_path / "llm.gguf", "--type", "q8_0")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(tmp_path / "llm.gguf")
    assert _file_type(tmp_path / "llm.gguf") == gguf.LlamaFileType.MOSTLY_Q8_0
    res = run_cli("quantize", converted_f32.mmproj_path, "-o", tmp_path / "mm.gguf", "--type", "F16")
    assert res.exit_code == 0, res.output
    assert read_mmproj(tmp_path / "mm.gguf").projection_dim == 64
    assert _file_type(tmp_path / "mm.gguf") == gguf.LlamaFileType.MOSTLY_F16


def test_cli_quantize_errors_are_one_line(converted_f32, tmp_path):
    llm, mm = converted_f32.llm_path, converted_f32.mmproj_path
    assert_one_line_error(run_cli("quantize", llm, "-o", tmp_path / "x.gguf", "--type", "Q3_X"), "Q3_X")
    assert_one_line_error(run_cli("quantize", mm, "-o", tmp_path / "x.gguf", "--type", "Q4_K_M"), "mmproj", "Q8_0")
    assert_one_line_error(run_cli("quantize", llm, "-o", llm, "--type", "Q8_0"), "same file")
    assert_one_line_error(run_cli("quantize", tmp_path / "none.gguf", "-o", tmp_path / "x.gguf", "--type", "Q8_0"),
                          "none.gguf")
    for src, name in ((llm, "half-llm.gguf"), (mm, "half-mmproj.gguf")):
        half = tmp_path / name
        half.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        assert_one_line_error(run_cli("quantize", half, "-o", tmp_path / "x.gguf", "--type", "Q8_0"),
                              name, "incomplete")
    assert not list(tmp_path.glob("*x.gguf*"))          # nothing written, no .part left


def test_convert_quantize(tiny_ckpt, tmp_path):
    hf = tiny_ckpt[1]
    res = run_cli("convert", hf, "-o", tmp_path / "a", "--outtype", "f32", "--quantize", "Q8_0")
    assert res.exit_code == 0, res.output
    names = sorted(p.split("/")[-1] for p in res.stdout.split())
    assert names == ["tiny-hf-llm-F32.gguf", "tiny-hf-llm-Q8_0.gguf", "tiny-hf-mmproj-F32.gguf", "tiny-hf.manifest.json"]
    m = json.loads((tmp_path / "a" / "tiny-hf.manifest.json").read_text())
    assert m["llm"] == "tiny-hf-llm-Q8_0.gguf" and m["quantize"] == "Q8_0" and m["llm_unquantized"] == "tiny-hf-llm-F32.gguf"
    assert resolve_pair(tmp_path / "a").llm_path.name == "tiny-hf-llm-Q8_0.gguf"

    res = run_cli("convert", hf, "-o", tmp_path / "b", "--quantize", "Q4_0", "--no-keep-unquantized")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "tiny-hf-llm-Q4_0.gguf", "tiny-hf-mmproj-F16.gguf", "tiny-hf.manifest.json"]
    assert_one_line_error(run_cli("convert", hf, "-o", tmp_path / "c", "--quantize", "Q9"), "Q9")
    assert_one_line_error(run_cli("convert", hf, "-o", tmp_path / "c", "--quantize", "F16"), "--outtype")


def test_eval_quant_writes_table_and_plot(converted_f32, tmp_path):
    report, plot = tmp_path / "quant.md", tmp_path / "quant.png"
    res = run_cli("eval-quant", converted_f32.llm_path.parent, "--types", "Q4_0,Q8_0", "--prompts", "3",
                  "--answer-tokens", "8", "--gen-tokens", "8", "--timing-runs", "1", "--threads", "1",
                  "--no-repack", "--report", report, "--plot", plot)
    assert res.exit_code == 0, res.output
    table = res.stdout
    assert report.read_text() == table
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| LLM type | file (MB) |") and "shapes accuracy" not in rows[0]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["F32 (source)", "Q4_0", "Q8_0"]
    assert "reference" in rows[1] and "%" in rows[3]
    print(table)
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400


def test_eval_quant_on_a_shapes_model_adds_accuracy(converted_f32, tmp_path):
    """A manifest with `shapes_eval` (as the demo model's) turns on the held-out answers and the accuracy column."""
    d = tmp_path / "model"
    d.mkdir()
    for p in (converted_f32.llm_path, converted_f32.mmproj_path):
        shutil.copy(p, d / p.name)
    m = dict(converted_f32.manifest, shapes_eval={"seed": 0, "n_images": 100})
    (d / converted_f32.manifest_path.name).write_text(json.dumps(m))
    res = run_cli("eval-quant", d, "--types", "Q8_0", "--prompts", "4", "--shapes", "4", "--gen-tokens", "8",
                  "--timing-runs", "1", "--threads", "1", "--no-repack")
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| ")]
    assert rows[0].rstrip().endswith("| shapes accuracy |") and len(rows) == 3
    assert "held-out shapes answers" in res.stdout and "4 held-out questions" in res.stdout
