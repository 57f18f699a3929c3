"""The server's bad-input table (RELIABILITY.md, network rows), each against the running demo server.
Image URLs point at a real listener that records every connection: a refusal must leave it at zero."""
from __future__ import annotations

import http.server
import threading

import httpx
import pytest
from server_helpers import SAMPLES, data_url, image_message, running_server

PNG = (SAMPLES / "shapes-1.png").read_bytes()


class _Listener:
    """A loopback HTTP server counting connections: /x.png is an image, /redir?to=URL redirects."""

    def __init__(self):
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/redir?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *a):
                pass

        class Server(http.server.ThreadingHTTPServer):
            def get_request(self):
                outer.hits += 1
                return super().get_request()

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def listeners():
    a, b = _Listener(), _Listener()
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def server(listeners):
    # 127.0.0.1 may be fetched (and may be private), "localhost" may not: a redirect there must be refused
    with running_server(parallel=2, allow_image_hosts=("127.0.0.1",), allow_private_image_hosts=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def strict():
    with running_server(parallel=2, api_key="sekrit", max_images=3, cors_origins=("http://localhost:3000",)) as srv:
        yield srv


def post(srv, body, **kw) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60, **kw)


def error(r: httpx.Response) -> str:
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body["message"]


def test_fetch_from_an_allowed_host_works(server, listeners):
    a, _ = listeners
    before = a.hits
    r = post(server, {"messages": [image_message("Describe this picture.", f"http://127.0.0.1:{a.port}/x.png")],
                      "temperature": 0})
    assert r.status_code == 200 and a.hits == before + 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://localhost:{b}/x.png", "http://169.254.169.254/latest",
                                 "http://127.0.0.1:{a}/redir?to=http://localhost:{b}/x.png", "ftp://127.0.0.1:{b}/x.png",
                                 "gopher://127.0.0.1:{b}/", "/etc/passwd"])
def test_refused_image_urls_never_connect(server, strict, listeners, url):
    a, b = listeners
    url = url.format(a=a.port, b=b.port)
    b_before = b.hits
    for srv, headers in ((server, {}), (strict, {"Authorization": "Bearer sekrit"})):
        r = post(srv, {"messages": [image_message("What is it?", url)]}, headers=headers)
        assert r.status_code == 400, r.text
        assert "messages[0].content[1]" in error(r)
    assert b.hits == b_before


def test_strict_server_refuses_even_its_own_listener(strict, listeners):
    a, _ = listeners
    before = a.hits
    r = post(strict, {"messages": [image_message("What?", f"http://127.0.0.1:{a.port}/x.png")]},
             headers={"Authorization": "Bearer sekrit"})
    assert r.status_code == 400 and "--allow-image-host" in error(r) and a.hits == before


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.parametrize("chunked", [False, True])
def test_200_mb_body_is_413_before_decoding(server, chunked):
    """The server runs in this process: its peak RSS must not grow by the body."""
    def body():
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            yield chunk
    headers = {"Content-Type": "application/json"}
    if not chunked:
        headers["Content-Length"] = str(200 << 20)
    peak0 = _rss_kb("VmHWM")
    try:
        r = httpx.post(server.url + "/v1/chat/completions", content=body(), headers=headers, timeout=60)
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pytest.fail("the server should answer 413, not drop the connection")
    assert r.status_code == 413 and "limit" in error(r)
    assert _rss_kb("VmHWM") - peak0 < 50 * 1024


def test_oversized_data_uri_is_413(server):
    big = "data:image/png;base64," + "A" * (15 << 20)
    r = post(server, {"messages": [image_message("What?", big)]})
    assert r.status_code == 413


@pytest.mark.parametrize("field,value", [("max_tokens", -1), ("max_tokens", 10**9), ("top_k", -5),
                                         ("temperature", -1), ("top_p", 0), ("n", 2), ("max_tokens", 100000),
                                         ("seed", "x"), ("stop", ["a", "b", "c", "d", "e"])])
def test_out_of_bounds_values_are_422(server, field, value):
    r = post(server, {"messages": [{"role": "user", "content": "hi"}], field: value})
    assert r.status_code == 422, r.text
    assert field in error(r) or field in r.json()["error"]["param"]


def test_bad_json_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in error(r)


def test_unknown_model_is_404(server):
    r = post(server, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_api_key(strict):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert post(strict, body).status_code == 401
    assert post(strict, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(strict, body, headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert httpx.get(strict.url + "/metrics").status_code == 401
    assert httpx.get(strict.url + "/health").status_code == 200


def test_foreign_origin_and_host_are_403(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = post(server, body, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers
    assert post(server, body, headers={"Host": "evil.example"}).status_code == 403
    assert post(server, body, headers={"Origin": server.url}).status_code == 200        # its own page


def test_cors_origin_flag_grants_that_origin(strict):
    pre = httpx.options(strict.url + "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = post(strict, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
             headers={"Origin": "http://localhost:3000", "Authorization": "Bearer sekrit"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_corrupt_image_names_the_part(server):
    half = "data:image/png;base64," + __import__("base64").b64encode(PNG[: len(PNG) // 2]).decode()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {
        "url": data_url(SAMPLES / "shapes-2.png")}}, {"type": "image_url", "image_url": {"url": half}}]}]
    r = post(server, {"messages": msgs})
    assert r.status_code == 400 and "messages[0].content[2]" in error(r)


def test_too_many_images_is_refused_before_fetching(strict, listeners):
    a, _ = listeners
    before = a.hits
    urls = [f"http://127.0.0.1:{a.port}/x.png"] * 4
    r = post(strict, {"messages": [image_message("What?", *urls)]}, headers={"Authorization": "Bearer sekrit"})
    assert r.status_code == 400 and "at most 3" in error(r) and a.hits == before


def test_context_too_small_for_the_images_is_400():
    from llava_local.runtime.options import EngineOptions
    # the demo model's images are 4 tokens and this prompt's text ~40: one image fits in 52 cells, four do not
    with running_server(parallel=1, max_queue=0, engine=EngineOptions(threads=2, n_ctx=52)) as srv:
        urls = [data_url(p) for p in sorted(SAMPLES.glob("*.png"))]
        r = post(srv, {"messages": [image_message("What?", *urls)], "max_tokens": 4})
        assert r.status_code == 400 and "tokens" in error(r), r.text
        assert post(srv, {"messages": [image_message("What?", urls[0])], "max_tokens": 4}).status_code == 200
        _queue_full_is_503(srv)


def _queue_full_is_503(srv):
    """--parallel 1 --max-queue 0: while one request is in flight (the engine held still), the next gets 503."""
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    os.kill(srv.engine.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, srv, body)
            deadline = time.time() + 10
            while not srv.engine.in_flight and time.time() < deadline:
                time.sleep(0.02)
            busy = post(srv, body)
            assert busy.status_code == 503 and busy.headers["retry-after"] and "busy" in error(busy)
            os.kill(srv.engine.pid, signal.SIGCONT)
            assert first.result().status_code == 200
    finally:
        os.kill(srv.engine.pid, signal.SIGCONT)


def test_public_bind_needs_an_api_key():
    from llava_local.errors import LlavaLocalError
    from llava_local.runtime.model_source import find_model
    from llava_local.runtime.options import EngineOptions
    from llava_local.server.launch import ServeOptions, Server
    with pytest.raises(LlavaLocalError, match="--api-key"):
        Server(find_model(None), EngineOptions(), ServeOptions(host="0.0.0.0"))
