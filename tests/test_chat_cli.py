"""`llava-local chat` without a terminal: one-shot (-p, stdin), --json, the REPL fed from a pipe,
and bad input as one `Error:` line."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llava_local.cli.main import main


def chat(*args, input=None, env=None):
    return CliRunner().invoke(main, ["chat", *map(str, args)], input=input, env=env)


@pytest.fixture(scope="module")
def model_dir(pair_f32):
    return pair_f32.llm_path.parent


def test_one_shot_equals_run_and_stdin_dash(model_dir, sample_png):
    a = chat("--model", model_dir, "-p", "What is it?", "--max-tokens", "6", sample_png)
    b = chat("--model", model_dir, "--max-tokens", "6", "-", sample_png, input="What is it?")
    c = CliRunner().invoke(main, ["run", "--model", str(model_dir), "-p", "What is it?", "--max-tokens", "6",
                                  str(sample_png)])
    assert a.exit_code == b.exit_code == c.exit_code == 0, (a.output, b.output, c.output)
    assert a.stdout == b.stdout == c.stdout and a.stdout.strip()


def test_json_record(model_dir, sample_png):
    res = chat("--model", model_dir, "-p", "What is it?", "--max-tokens", "3", "--json", sample_png)
    rec = json.loads(res.stdout)
    assert rec["n_tokens"] == 3 and rec["timings"]["images_encoded"] == 1
    assert {"encode_s", "prefill_s", "decode_tok_per_s"} <= set(rec["timings"])


def test_repl_from_a_pipe_keeps_the_conversation(model_dir, sample_png, tmp_path):
    conv = tmp_path / "conv.json"
    script = f"What is it?\n/stats\nAnd then?\n/image {tmp_path / 'nope.png'}\nStill here?\n/save {conv}\n"
    res = chat("--model", model_dir, "--max-tokens", "4", sample_png, input=script)
    assert res.exit_code == 0, res.output
    assert "nope.png: no such file" in res.stderr          # an error, and the REPL went on
    saved = json.loads(conv.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 3
    assert saved["messages"][0]["content"].startswith("<image>\n") and len(saved["images"]) == 1


@pytest.mark.parametrize("case", ["wrong mmproj", "empty prompt", "missing image", "context too small",
                                  "unknown backend"])
def test_bad_input_is_one_line(model_dir, pair_f32, other_width_pair, sample_png, tmp_path, case):
    args = {
        "wrong mmproj": ["--model", pair_f32.llm_path, "--mmproj", other_width_pair.mmproj_path, "-p", "hi",
                         sample_png],
        "empty prompt": ["--model", model_dir, "-p", "", sample_png],
        "missing image": ["--model", model_dir, "-p", "hi", tmp_path / "missing.jpg"],
        "context too small": ["--model", model_dir, "--ctx", "16", "-p", "hi", sample_png],
        "unknown backend": ["--model", model_dir, "--vision-backend", "magic", "-p", "hi", sample_png],
    }[case]
    res = chat(*args)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.output, res.stderr


def test_missing_demo_model_is_a_clear_error(monkeypatch, tmp_path, sample_png):
    import llava_local.runtime.model_source as ms
    monkeypatch.setattr(ms, "DEMO_DIR", tmp_path / "no-demo")
    res = chat("-p", "hi", sample_png, env={"LLAVA_LOCAL_MODEL": ""})
    assert res.exit_code == 1 and "demo model is missing" in res.stderr
