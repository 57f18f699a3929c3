"""Structured output (runtime/grammar.py) on the demo model: a JSON schema becomes a llama.cpp grammar,
every sampled answer parses and validates, the sampler's fast paths pick what masking the whole
vocabulary picks, a max_tokens cut is an error (the session goes on), and `chat --json-schema` /
`caption --json-schema` end to end.

    .venv/bin/python -m pytest -q tests/test_structured_output.py
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error
from llava_local.caption.job import caption_config
from llava_local.caption.worker import WorkerConfig
from llava_local.cli.main import main
from llava_local.errors import LlavaLocalError, StructuredOutputError
from llava_local.prompts.templates import Message
from llava_local.prompts.turns import user_content
from llava_local.runtime.generate import Decode
from llava_local.runtime.grammar import Grammar, JsonOutput
from llava_local.runtime.sampling import Sampler, SamplingParams

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "llava_local" / "data" / "demo"
IMAGES = sorted((REPO / "llava_local" / "data" / "samples").glob("*.png"))
PROMPT = "Describe the shape."
SCHEMA = {"type": "object",
          "properties": {"shape": {"enum": ["circle", "square", "triangle", "star"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9},
                         "color": {"type": "string", "maxLength": 12}},
          "required": ["shape", "count", "color"], "additionalProperties": False}
FREE_TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
PERMISSIVE_GBNF = r"root ::= [^\x00]*"      # any text, and end of generation anywhere
FAST = ["--model", DEMO, "--vision-backend", "native", "--threads", "1", "--ctx", "512"]


@pytest.fixture(scope="module")
def engine():
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.model_pair import resolve_pair
    eng = Engine(resolve_pair(DEMO), vision_backend="native", n_ctx=512, threads=1)
    yield eng
    eng.close()


def prefill_question(engine) -> None:
    """Evaluate the demo question about IMAGES[0] on a fresh cache (the decode loop follows)."""
    items = engine.prompt_items([Message("user", user_content(PROMPT, 1))])
    embeds, _ = engine.image_embeddings(engine.load_images(IMAGES[:1]))
    engine.llm.reset()
    engine.prefill(items, embeds)


def cli(*args, input=None):
    return CliRunner().invoke(main, [*map(str, args)], input=input)


# --- the acceptance: sampled answers always parse and validate -----------------------------------

@pytest.mark.parametrize("sampling", [{"top_k": 0, "top_p": 1.0}, {}], ids=["whole-distribution", "top-k-40"])
def test_sampled_answers_parse_and_validate(engine, sampling):
    out = JsonOutput(SCHEMA)
    answers = [engine.ask(PROMPT, IMAGES[:1], max_tokens=96, output=out,
                          sampling=SamplingParams(temperature=1.0, seed=seed, **sampling)) for seed in range(20)]
    for a in answers:
        assert a.finish_reason == "stop", a.text
        assert json.loads(a.text) == a.json
        jsonschema.validate(a.json, SCHEMA)
    assert len({a.text for a in answers}) > 5          # sampled, not one answer 20 times


# --- the sampler: masks only where it must, picks the same tokens ---------------------------------

class _AgainstFullMask:
    """Decode's sampler: the engine's grammar sampler, checked at every step against a plain sampler
    drawing from the logits masked over the whole vocabulary (same params and seed)."""

    def __init__(self, engine, params: SamplingParams, output: JsonOutput):
        self.fast = engine.sampler(params, output)
        self.plain = Sampler(params)
        self.grammar = Grammar(engine.llm, output.gbnf)
        self.steps = 0

    def __call__(self, logits, history):
        tok = self.fast(logits, history)
        want = self.plain(self.grammar.mask(logits), history)
        self.grammar.accept(want)
        assert tok == want, f"step {self.steps}: {tok} != {want}"
        self.steps += 1
        return tok


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repeat_penalty=1.3),
                                    SamplingParams(temperature=1.0, seed=1),
                                    SamplingParams(temperature=1.5, top_k=8, top_p=0.9, seed=2),
                                    SamplingParams(temperature=1.0, top_k=0, seed=3)],
                         ids=["greedy", "greedy-penalty", "top-k-40", "top-k-8-top-p", "top-k-0"])
def test_fast_paths_pick_what_full_masking_picks(engine, params):
    """Greedy tests the best token alone, top-k checks the best candidates only (grammar.py): the
    answers equal those drawn after masking every token the grammar forbids."""
    prefill_question(engine)
    check = _AgainstFullMask(engine, params, JsonOutput(FREE_TEXT))
    dec = Decode(engine.llm, check, max_tokens=48)
    text = engine.llm.detokenize(dec.run())
    assert check.steps == len(dec.tokens) + (dec.finish_reason == "stop") > 10, text
    assert text.startswith("{")


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repeat_penalty=1.3)], ids=["greedy", "penalty"])
def test_permissive_grammar_changes_nothing(engine, params):
    answers = []
    for grammar in (None, Grammar(engine.llm, PERMISSIVE_GBNF)):
        prefill_question(engine)
        answers.append(Decode(engine.llm, Sampler(params, grammar), max_tokens=48).run())
    assert answers[0] == answers[1] and len(answers[0]) > 5


def test_mask_leaves_the_logits_alone_and_allows_only_the_json_start(engine):
    prefill_question(engine)
    logits = engine.llm.last_logits().copy()
    logits.setflags(write=False)                      # as a view of llama.cpp's buffer: never written
    g = Grammar(engine.llm, JsonOutput(SCHEMA).gbnf)
    masked = g.mask(logits)
    allowed = np.flatnonzero(np.isfinite(masked))
    assert 0 < len(allowed) < engine.llm.n_vocab // 4
    assert np.array_equal(masked[allowed], logits[allowed])
    assert all(engine.llm.token_bytes(t).startswith(b"{") for t in allowed)
    assert not any(engine.llm.is_eog(t) for t in allowed)      # end of generation only once the JSON closes
    first = int(allowed[0])
    assert g.allows(first) and not g.allows(engine.llm.eos)
    with pytest.raises(LlavaLocalError, match="does not continue the grammar"):
        g.accept(engine.llm.eos)                        # refused here: llama.cpp would abort the process
    g.close()
    assert engine.sampler(SamplingParams()).grammar is None


def test_max_tokens_cut_is_an_error_and_the_session_goes_on(engine):
    out = JsonOutput(SCHEMA)
    s = engine.chat_session()
    with pytest.raises(StructuredOutputError, match="max_tokens reached before the JSON closed"):
        s.ask(PROMPT, IMAGES[:1], max_tokens=5, output=out)
    assert s.last.finish_reason == "length" and s.last.json is None and len(s.last.tokens) == 5
    assert [m.role for m in s.messages] == ["user", "assistant"]
    ans = s.ask("And the other one?", max_tokens=96, output=out)
    jsonschema.validate(ans.json, SCHEMA)
    assert s.totals["turns"] == 2


# --- schemas ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, message", [
    ({"type": 12}, "invalid JSON schema"),
    ({"properties": {"a": {"minLength": -1}}}, "invalid JSON schema"),
    ({"$ref": "https://example.com/schema.json"}, "not supported by the grammar converter"),
    ([{"type": "object"}], "must be a JSON object"),
])
def test_bad_schema_is_a_clear_error(schema, message):
    with pytest.raises(LlavaLocalError, match=message):
        JsonOutput(schema)


def test_parse_checks_what_the_grammar_cannot(caplog):
    with caplog.at_level(logging.WARNING, logger="llava_local.runtime.grammar"):
        bounded = JsonOutput({"type": "number", "maximum": 1})
    assert "does not enforce the JSON schema's maximum" in caplog.text
    assert bounded.parse("0.5", "stop") == 0.5
    with pytest.raises(StructuredOutputError, match="does not match the JSON schema: 5 is greater"):
        bounded.parse("5", "stop")
    obj = JsonOutput.json_object()
    assert obj.parse('{"a": [1, null]}', "stop") == {"a": [1, None]}
    with pytest.raises(StructuredOutputError, match="not of type 'object'"):
        obj.parse("[1]", "stop")
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        obj.parse('{"a": "line\nbreak"}', "stop")       # raw control characters: not JSON
    for text, why in (('{"a": 1e999}', "number 1e999 is out of range"), ('{"a": NaN}', "NaN is not JSON")):
        with pytest.raises(StructuredOutputError, match=why):
            obj.parse(text, "stop")                    # never passed on: Python would print it as Infinity/NaN
    with pytest.raises(StructuredOutputError, match="max_tokens reached"):
        obj.parse('{"a": 1}', "length")
    # small integer ranges become enums the grammar enforces; strings exclude control characters;
    # exponents stay within float range
    gbnf = JsonOutput(SCHEMA).gbnf
    assert 'count ::= "0" | "1"' in gbnf and r"\x00-\x1F" in gbnf
    assert "([eE] [-+]? [0-9] [0-9]?)?" in JsonOutput({"type": "number"}).gbnf


def test_schema_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    for name, message in [("missing.json", "no such file"), ("bad.json", "not JSON"),
                          ("list.json", "must be a JSON object, got an array")]:
        with pytest.raises(LlavaLocalError, match=message) as exc:
            JsonOutput.from_file(tmp_path / name)
        assert name in str(exc.value)
    (tmp_path / "ok.json").write_text(json.dumps(SCHEMA))
    assert JsonOutput.from_file(tmp_path / "ok.json").schema == SCHEMA


# --- the command line -------------------------------------------------------------------------------

@pytest.fixture()
def schema_file(tmp_path) -> Path:
    p = tmp_path / "shape.schema.json"
    p.write_text(json.dumps(SCHEMA))
    return p


def test_chat_one_shot_prints_compact_json(schema_file):
    res = cli("chat", *FAST, "--json-schema", schema_file, "--temp", "1", "--seed", "4", "-p", PROMPT, IMAGES[0])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    jsonschema.validate(obj, SCHEMA)
    assert res.stdout == json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
    rec = json.loads(cli("chat", *FAST, "--json-schema", schema_file, "--json", "-p", PROMPT, IMAGES[0]).stdout)
    assert json.loads(rec["text"]) == rec["json"] and rec["finish_reason"] == "stop"


def test_chat_repl_answers_json_and_survives_a_cut(schema_file):
    res = cli("chat", *FAST, "--json-schema", schema_file, IMAGES[0],
              input=f"{PROMPT}\n/set max-tokens 4\n{PROMPT}\n")
    assert res.exit_code == 0, res.output
    jsonschema.validate(json.loads(res.stdout.splitlines()[0]), SCHEMA)
    assert "Error: max_tokens reached before the JSON closed" in res.stderr


@pytest.mark.parametrize("case", ["missing", "not JSON", "invalid schema"])
def test_bad_schema_file_is_one_line(tmp_path, case):
    p = tmp_path / "schema.json"
    if case != "missing":
        p.write_text("{oops" if case == "not JSON" else json.dumps({"type": "object", "required": "shape"}))
    for command in ("chat", "caption"):
        res = cli(command, *FAST, "--json-schema", p, "-p", PROMPT, IMAGES[0])
        assert_one_line_error(res, "schema.json")


def test_caption_records_carry_the_parsed_object(schema_file, tmp_path):
    out = tmp_path / "captions.jsonl"
    res = cli("caption", *FAST, "--json-schema", schema_file, "--temp", "1", "--seed", "0", "--max-tokens", "96",
              "-p", PROMPT, "-o", out, *IMAGES[:2])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), recs
    for r in recs:
        jsonschema.validate(r["json"], SCHEMA)
        assert json.loads(r["caption"]) == r["json"] and r["finish_reason"] == "stop"
    cut = tmp_path / "cut.jsonl"
    res = cli("caption", *FAST, "--json-schema", schema_file, "--max-tokens", "4", "-p", PROMPT, "-o", cut, IMAGES[0])
    assert res.exit_code == 1, res.output                # one failed image
    (rec,) = [json.loads(line) for line in cut.read_text().splitlines()]
    assert rec["status"] == "error" and "max_tokens reached before the JSON closed" in rec["error"]
    assert "json" not in rec and rec["caption"] is None


def test_schema_is_part_of_the_caption_fingerprint():
    from llava_local.runtime.model_pair import resolve_pair
    pair = resolve_pair(DEMO)
    base = WorkerConfig(llm_path=str(pair.llm_path), mmproj_path=str(pair.mmproj_path), prompt=PROMPT)
    with_schema = WorkerConfig(**{**base.__dict__, "json_schema": SCHEMA})
    other = WorkerConfig(**{**base.__dict__, "json_schema": FREE_TEXT})
    prints = {caption_config(w).fingerprint() for w in (base, with_schema, other)}
    assert len(prints) == 3
