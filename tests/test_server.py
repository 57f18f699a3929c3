"""`llava-local serve` with real clients: the official `openai` package and httpx, against the demo
model in its engine process. Answers are compared with `llava-local chat -p` and the chat session."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import jsonschema
import pytest
from click.testing import CliRunner
from openai import OpenAI
from server_helpers import SAMPLES, data_url, image_message, running_server

from llava_local.cli.main import main

IMAGES = [SAMPLES / f"shapes-{i}.png" for i in range(1, 5)]
QUESTION = "Describe this picture."


@pytest.fixture(scope="module")
def server():
    with running_server(parallel=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def cli_answer(prompt: str, image) -> str:
    r = CliRunner().invoke(main, ["chat", "-p", prompt, "--temp", "0", "--threads", "2", str(image)])
    assert r.exit_code == 0, r.output
    return r.stdout.strip()


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


def test_openai_client_plain_and_streaming_equal_chat_cli(server, client):
    msgs = [image_message(QUESTION, data_url(IMAGES[0]))]
    r = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0)
    expected = cli_answer(QUESTION, IMAGES[0])
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert client.models.list().data[0].id == "shapes-demo"


async def _one_client(url: str, k: int, refs: dict) -> list[tuple[int, str]]:
    from openai import AsyncOpenAI
    c = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = []
    for j in range(4):
        i = (k + j) % 4
        msgs = [image_message(QUESTION, refs["urls"][i])]
        if (k + j) % 2:
            stream = await c.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0,
                                                     max_tokens=48, stream=True)
            parts, finish = [], []
            async for ch in stream:
                parts.append(ch.choices[0].delta.content or "")
                finish += [ch.choices[0].finish_reason] if ch.choices[0].finish_reason else []
            assert len(finish) == 1
            out.append((i, "".join(parts)))
        else:
            r = await c.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0, max_tokens=48)
            assert r.choices[0].finish_reason in ("stop", "length")
            out.append((i, r.choices[0].message.content))
    await c.close()
    return out


@pytest.mark.slow   # make test-slow (.ci/run): ~30 s of decoding or an engine restart
def test_sixteen_concurrent_clients(server, client):
    urls = [data_url(p) for p in IMAGES]
    refs = {"urls": urls, "single": [client.chat.completions.create(
        model="shapes-demo", messages=[image_message(QUESTION, u)], temperature=0, max_tokens=48,
    ).choices[0].message.content for u in urls]}
    assert len(set(refs["single"])) == 4, refs["single"]     # four different answers: a mix-up would show

    async def run():
        return await asyncio.gather(*(_one_client(server.url, k, refs) for k in range(16)))
    results = [r for client_results in asyncio.run(run()) for r in client_results]
    assert len(results) == 64 and all(text for _, text in results)
    same = sum(text == refs["single"][i] for i, text in results)
    mixed = [(i, text) for i, text in results if text != refs["single"][i] and text in refs["single"]]
    assert not mixed, mixed
    assert same / 64 >= 0.95, f"{same}/64 equal to the single-request answers"


@pytest.mark.parametrize("max_tokens", [64, 5])     # answers that end, and answers cut at max_tokens
def test_multi_turn_evaluates_only_new_tokens(server, client, max_tokens):
    msgs = [image_message(QUESTION, data_url(IMAGES[2 if max_tokens == 64 else 1]))]
    encodes0 = metric(server, "llava_local_image_encodes_total")
    usages, reasons = [], []
    for question in ("What color is the background?", "How many shapes are there?"):
        r = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0, max_tokens=max_tokens)
        usages.append(r.usage)
        reasons.append(r.choices[0].finish_reason)
        msgs = msgs + [{"role": "assistant", "content": r.choices[0].message.content},
                       {"role": "user", "content": question}]
        encodes_after_turn = metric(server, "llava_local_image_encodes_total")
    r = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0, max_tokens=max_tokens)
    usages.append(r.usage)
    assert reasons[0] == ("length" if max_tokens == 5 else "stop")
    assert metric(server, "llava_local_image_encodes_total") - encodes0 <= 1     # the 1st turn's (or cached)
    assert metric(server, "llava_local_image_encodes_total") == encodes_after_turn
    for before, after, reason in zip(usages, usages[1:], reasons):
        # everything of the previous request (its prompt and answer) is reused; only the new turn is evaluated
        # (an answer cut at max_tokens has its last token evaluated with the new turn)
        assert after.prompt_tokens_details.cached_tokens == \
            before.prompt_tokens + before.completion_tokens - (reason == "length")
        assert after.prompt_tokens - after.prompt_tokens_details.cached_tokens < 30


@pytest.mark.parametrize("max_tokens", [32, 5])
def test_multi_turn_answers_equal_the_chat_session(server, client, max_tokens):
    from llava_local.runtime.engine import Engine
    from llava_local.runtime.model_source import find_model
    eng = Engine(find_model(None), threads=2)
    session = eng.chat_session(max_tokens=max_tokens)
    msgs = []
    for text, image in ((QUESTION, IMAGES[3]), ("What color is the background?", None), ("And the shape?", None)):
        msgs.append(image_message(text, data_url(image)) if image else {"role": "user", "content": text})
        r = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0, max_tokens=max_tokens)
        expected = session.ask(text, [image] if image else []).text
        assert r.choices[0].message.content == expected
        msgs.append({"role": "assistant", "content": expected})
    eng.close()


@pytest.mark.slow   # make test-slow (.ci/run): ~30 s of decoding or an engine restart
def test_disconnect_mid_stream_frees_only_that_sequence(pair_f32):
    # the tiny random model rambles to max_tokens: a stream is still running when its client leaves
    msgs = [image_message("Describe it.", data_url(IMAGES[1]))]
    body = {"messages": msgs, "temperature": 0, "max_tokens": 16}
    import concurrent.futures
    with running_server(pair_f32, parallel=4) as srv, httpx.Client(base_url=srv.url, timeout=60) as h, \
            httpx.Client(base_url=srv.url, timeout=60) as other, concurrent.futures.ThreadPoolExecutor(2) as pool:
        alone = h.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "max_tokens": 1000}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            next(lines)
            futures = [pool.submit(other.post, "/v1/chat/completions", json=body) for _ in range(2)]
            next(lines)
            assert srv.engine.in_flight >= 1
        # the client went away mid-stream: its sequence is cancelled, the two others finish (a random model's
        # near-tied logits may move a late token when batched: their length is checked, and the start)
        results = [f.result().json() for f in futures]
        assert [r["usage"]["completion_tokens"] for r in results] == [16, 16]
        assert all(r["choices"][0]["message"]["content"][:8] == alone[:8] for r in results)
        deadline = time.time() + 10
        while srv.engine.in_flight and time.time() < deadline:
            time.sleep(0.05)
        assert srv.engine.in_flight == 0
        assert metric(srv, 'llava_local_requests_total{status="499"}') == 1


def test_health_is_503_while_loading():
    with running_server(wait=False) as srv:
        r = httpx.get(srv.url + "/health")        # the engine process is still starting (a second or more)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["status"] == "loading"
        c = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert c.status_code == 503 and c.json()["error"]["code"] == "model_loading"
        srv.wait_ready()
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["shape", "count", "color"],
          "properties": {"shape": {"enum": ["circle", "square", "triangle", "star"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9},
                         "color": {"type": "string", "maxLength": 12}}}


def test_json_schema_answers_validate_for_20_seeds(server, client):
    msgs = [image_message("Describe the shape as JSON.", data_url(IMAGES[0]))]
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}
    for seed in range(20):
        r = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=1.0, seed=seed,
                                           max_tokens=96, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 3,
                                                             "response_format": fmt})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


@pytest.mark.slow   # make test-slow (.ci/run): ~30 s of decoding or an engine restart
def test_worker_killed_mid_request_fails_that_request_and_restarts(server, client):
    msgs = [image_message(QUESTION, data_url(IMAGES[0]))]
    pid = server.engine.pid
    os.kill(pid, signal.SIGSTOP)           # the request waits in the engine's pipe ...
    try:
        with httpx.Client(base_url=server.url, timeout=60) as h:
            import threading
            got = {}
            t = threading.Thread(target=lambda: got.setdefault("r", h.post(
                "/v1/chat/completions", json={"messages": msgs, "temperature": 0})))
            t.start()
            deadline = time.time() + 10
            while not server.engine.in_flight and time.time() < deadline:
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)   # ... when the engine dies
            t.join(30)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    r = got["r"]
    assert r.status_code == 500 and "SIGKILL" in r.json()["error"]["message"]
    server.wait_ready(60)
    assert server.engine.pid != pid
    ok = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0)
    assert ok.choices[0].message.content
    assert metric(server, "llava_local_engine_restarts_total") >= 1


def test_stop_strings_cut_the_answer_streamed_or_not(server, client):
    msgs = [image_message(QUESTION, data_url(IMAGES[0]))]
    full = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0).choices[0].message.content
    word = full.split()[4]
    cut = full[:full.index(word)].rstrip()
    r = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0, stop=[word, "zzz"])
    assert r.choices[0].message.content.rstrip() == cut and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="shapes-demo", messages=msgs, temperature=0, stop=word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).rstrip() == cut
