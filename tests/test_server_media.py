"""Tests for llava_local.server.media: which image_url values the server fetches, and how.

Every network case talks to a real `ThreadingHTTPServer` on 127.0.0.1 that counts each TCP
connection it accepts, so "refused" means refused before connecting: zero hits. The "Network" rows
of RELIABILITY.md (file:///etc/passwd, loopback, 169.254.169.254, redirects, 200 MB bodies) each
have a test here. Names other than IP literals are answered by the `dns` fixture, which wraps the
real `socket.getaddrinfo` and records every lookup (nothing leaves the machine).

    .venv/bin/python -m pytest -q tests/test_server_media.py
"""

import base64
import http.server
import io
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from llava_local.errors import LlavaLocalError
from llava_local.server.media import MediaError, MediaPolicy, image_bytes


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
LOCAL = frozenset({"127.0.0.1"})


class Listener:
    """An HTTP server in a thread that records every connection and request it gets."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.connections = 0
        self.requests: list[tuple[str, dict]] = []  # (path, headers)
        self.release = threading.Event()  # set at teardown: stalled handlers stop waiting
        listener = self

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address):
                listener.connections += 1
                return True

        self.server = Server(("127.0.0.1", 0), _Handler)
        self.server.listener = self
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def hits(self) -> int:
        time.sleep(0.05)  # the accept runs on the server thread; let a stray connection land
        return self.connections

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked bodies

    def log_message(self, *args):
        pass

    def do_GET(self):
        listener = self.server.listener
        listener.requests.append((self.path, dict(self.headers)))
        path, _, query = self.path.partition("?")
        args = dict(urllib.parse.parse_qsl(query))
        route = getattr(self, "route_" + path.strip("/").replace("-", "_").replace(".", "_"), self.route_missing)
        try:
            route(args, listener)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def send(self, status: int, headers: dict, body: bytes = b""):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def route_x_png(self, args, listener):
        self.send(200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))}, PNG)

    def route_redir(self, args, listener):
        self.send(302, {"Location": args["to"], "Content-Length": "0"})

    def route_loop(self, args, listener):
        self.send(302, {"Location": "/loop", "Content-Length": "0"})

    def route_claims_big(self, args, listener):
        self.send(200, {"Content-Length": args["n"], "Connection": "close"})  # then no body at all

    def route_chunked(self, args, listener):
        self.send(200, {"Transfer-Encoding": "chunked"})
        for _ in range(int(args["n"]) // 1000):
            self.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_drip(self, args, listener):
        self.send(200, {"Content-Length": "100"})
        for _ in range(100):
            if listener.release.wait(0.1):
                return
            self.wfile.write(b"x")
            self.wfile.flush()

    def route_stall(self, args, listener):
        listener.release.wait(5)

    def route_missing(self, args, listener):
        self.send(404, {"Content-Length": "0"})


@pytest.fixture
def make_listener():
    made = []

    def make(**kw) -> Listener:
        made.append(Listener(**kw))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


@pytest.fixture
def listener(make_listener) -> Listener:
    return make_listener()


@pytest.fixture
def dns(monkeypatch):
    """socket.getaddrinfo that records each lookup and answers names in `dns.names` with an IP literal.

    A tuple answers with several addresses at once; a list is consumed one answer per lookup (DNS
    rebinding), and an exhausted list fails the lookup.
    """
    real = socket.getaddrinfo

    class Dns:
        calls: list[str] = []
        names: dict = {}

    def lookup(host, port, *args, **kw):
        Dns.calls.append(host)
        answer = Dns.names.get(host, host)
        if isinstance(answer, list):
            if not answer:
                raise socket.gaierror(socket.EAI_NONAME, "rebinding answer exhausted")
            answer = answer.pop(0)
        return [info for literal in ((answer,) if isinstance(answer, str) else answer)
                for info in real(literal, port, *args, **kw)]

    Dns.calls, Dns.names = [], {}
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return Dns


def refused(url: str, policy: MediaPolicy, *words: str, status: int = 400) -> MediaError:
    with pytest.raises(MediaError) as info:
        image_bytes(url, policy)
    err = info.value
    assert isinstance(err, LlavaLocalError)
    assert err.status == status, str(err)
    assert str(err).startswith("image_url"), str(err)  # names the part that was refused
    for word in words:
        assert word in str(err), str(err)
    return err


# --- data: ---------------------------------------------------------------------------------------


def test_data_uri_base64_and_percent_encoded_decode():
    b64 = base64.b64encode(PNG).decode()
    for media_type in ("image/png", "image/jpeg", "application/octet-stream", ""):
        assert image_bytes(f"data:{media_type};base64,{b64}", MediaPolicy()) == PNG
    assert image_bytes("data:image/png," + urllib.parse.quote_from_bytes(PNG), MediaPolicy()) == PNG
    assert image_bytes("DATA:image/png;BASE64," + b64, MediaPolicy()) == PNG


def test_data_uri_non_image_type_and_bad_base64_refused():
    refused("data:text/html;base64,PGgxPmhpPC9oMT4=", MediaPolicy(), "'text/html' is not an image type")
    refused("data:image/png;base64,not*base64!", MediaPolicy(), "not valid base64")
    refused("data:image/png;base64,", MediaPolicy(), "empty")
    refused("data:image/png;base64" + "A" * 5000, MediaPolicy(), "no ','")


def test_data_uri_too_large_is_413_before_decoding():
    # 20 MB of characters that are not base64: a decoder would answer 400, the size check answers 413.
    url = "data:image/png;base64," + "!" * (20 * 1024 * 1024)
    start = time.monotonic()
    refused(url, MediaPolicy(), "too large", status=413)
    assert time.monotonic() - start < 0.5
    refused("data:image/png," + "%41" * 11, MediaPolicy(max_bytes=10), "too large", status=413)
    refused("data:image/png," + "%" * 30, MediaPolicy(max_bytes=10), "too large", status=413)  # no valid %XX


def test_data_uri_size_limit_is_exact_with_padding():
    ten, eleven = bytes(range(10)), bytes(range(11))  # base64 with "==" and "=" padding
    assert image_bytes("data:;base64," + base64.b64encode(ten).decode(), MediaPolicy(max_bytes=10)) == ten
    refused("data:;base64," + base64.b64encode(eleven).decode(), MediaPolicy(max_bytes=10), "too large", status=413)


# --- other schemes -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme_url, scheme", [
    ("ftp://127.0.0.1:{port}/x.png", "'ftp'"),
    ("gopher://127.0.0.1:{port}/_GET%20/x.png", "'gopher'"),
    ("javascript:alert(1)", "'javascript'"),
    ("x.png", "no scheme"),
    ("//127.0.0.1:{port}/x.png", "no scheme"),
    ("", "no scheme"),
])
def test_other_schemes_refused_without_connecting(listener, scheme_url, scheme):
    everything = MediaPolicy(allow_hosts=LOCAL, allow_private=True, media_dir=Path("/"))
    refused(scheme_url.format(port=listener.port), everything, scheme)
    assert listener.hits() == 0


# --- file:// -------------------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path) -> Path:
    (tmp_path / "media" / "sub").mkdir(parents=True)
    (tmp_path / "media" / "sub" / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.txt").write_text("root:x:0:0:secret line\n")
    return tmp_path / "media"


def test_file_urls_refused_without_media_dir():
    err = refused("file:///etc/passwd", MediaPolicy(), "file:// URLs are off", "--media-dir")
    assert "root" not in str(err)


def test_file_under_media_dir_is_read(media):
    policy = MediaPolicy(media_dir=media)
    assert image_bytes((media / "sub" / "cat.png").as_uri(), policy) == PNG
    assert image_bytes(f"file://localhost{media}/sub/cat%2Epng", policy) == PNG


def test_file_outside_media_dir_refused_whether_or_not_it_exists(media):
    policy = MediaPolicy(media_dir=media)
    for url in ("file:///etc/passwd", f"file://{media}/../secret.txt", f"file://{media}/%2e%2e/secret.txt",
                "file:///no/such/file.png"):
        err = refused(url, policy, "outside --media-dir")
        assert "secret line" not in str(err) and "root:x" not in str(err)


def test_symlink_escaping_media_dir_refused(media):
    (media / "escape.png").symlink_to(media.parent / "secret.txt")
    (media / "escape_dir").symlink_to(media.parent)
    (media / "inside.png").symlink_to(media / "sub" / "cat.png")
    policy = MediaPolicy(media_dir=media)
    refused((media / "escape.png").as_uri(), policy, "outside --media-dir")
    refused((media / "escape_dir" / "secret.txt").as_uri(), policy, "outside --media-dir")
    assert image_bytes((media / "inside.png").as_uri(), policy) == PNG  # links that stay inside are fine


def test_file_bad_cases(media):
    policy = MediaPolicy(media_dir=media, max_bytes=len(PNG) - 1)
    refused((media / "sub" / "cat.png").as_uri(), policy, "too large", status=413)
    policy = MediaPolicy(media_dir=media)
    refused((media / "missing.png").as_uri(), policy, "cannot be opened")
    refused((media / "sub").as_uri(), policy, "not a regular file")
    refused(f"file://evil.example{media}/sub/cat.png", policy, "host 'evil.example' is not allowed")
    refused("file:sub/cat.png", policy, "not an absolute file path")
    refused(f"file://{media}/sub/cat.png%00.txt", policy, "not an absolute file path")
    refused("file:///x.png", MediaPolicy(media_dir=media / "gone"), "--media-dir does not exist")


# --- http(s):// ----------------------------------------------------------------------------------


def test_http_refused_by_default_without_connecting(listener):
    refused(listener.url("/x.png"), MediaPolicy(), "host 127.0.0.1 is not allowed", "--allow-image-host 127.0.0.1")
    assert listener.hits() == 0


def test_allowed_host_resolving_to_loopback_refused_without_connecting(listener, dns):
    refused(listener.url("/x.png"), MediaPolicy(allow_hosts=LOCAL), "loopback address 127.0.0.1")
    dns.names["images.test"] = "127.0.0.1"
    refused(listener.url("/x.png", host="images.test"), MediaPolicy(allow_hosts=frozenset({"images.test"})),
            "host images.test resolves to loopback")
    refused(listener.url("/x.png", host="[::ffff:127.0.0.1]"), MediaPolicy(allow_hosts=frozenset({"::ffff:127.0.0.1"})),
            "loopback")  # IPv4-mapped IPv6 is unwrapped before the check
    assert listener.hits() == 0


def test_allow_private_fetches_with_one_connection(listener):
    assert image_bytes(listener.url("/x.png"), MediaPolicy(allow_hosts=LOCAL, allow_private=True)) == PNG
    assert listener.hits() == 1
    assert [path for path, _ in listener.requests] == ["/x.png"]


def test_host_allow_list_is_case_insensitive_and_idna(listener, dns):
    dns.names["xn--bcher-kva.test"] = "127.0.0.1"
    policy = MediaPolicy(allow_hosts=frozenset({"Bücher.TEST"}), allow_private=True)
    assert image_bytes(listener.url("/x.png", host="BÜCHER.test"), policy) == PNG
    assert image_bytes(listener.url("/x.png", host="xn--bcher-kva.test."), policy) == PNG
    assert {headers["Host"] for _, headers in listener.requests} == {f"xn--bcher-kva.test:{listener.port}"}


def test_cloud_metadata_address_refused_quickly():
    start = time.monotonic()
    refused("http://169.254.169.254/latest/meta-data/", MediaPolicy(allow_hosts=frozenset({"169.254.169.254"})),
            "link-local address 169.254.169.254")
    assert time.monotonic() - start < 0.5


def test_redirect_to_host_not_allowed_refused(make_listener):
    first, second = make_listener(), make_listener()
    target = second.url("/x.png", host="localhost")
    refused(first.url("/redir?to=" + urllib.parse.quote(target)), MediaPolicy(allow_hosts=LOCAL, allow_private=True),
            "host localhost is not allowed")
    assert first.hits() == 1 and second.hits() == 0


def test_redirect_target_address_rechecked(make_listener, dns):
    # allow_private lets 127.0.0.1 through, but 0.0.0.0 (which Linux routes to the local host) never.
    first, second = make_listener(), make_listener()
    policy = MediaPolicy(allow_hosts=frozenset({"127.0.0.1", "0.0.0.0"}), allow_private=True)
    target = second.url("/x.png", host="0.0.0.0")
    refused(first.url("/redir?to=" + urllib.parse.quote(target)), policy, "unspecified or multicast address 0.0.0.0")
    assert first.hits() == 1 and second.hits() == 0
    dns.calls.clear()
    assert image_bytes(first.url("/redir?to=/x.png"), policy) == PNG  # a relative Location, same host
    assert dns.calls == ["127.0.0.1", "127.0.0.1"]  # one lookup and one check per hop


def test_every_resolved_address_is_checked(listener, dns):
    dns.names["multi.test"] = ("127.0.0.1", "0.0.0.0")  # the first would pass, the second must not
    policy = MediaPolicy(allow_hosts=frozenset({"multi.test"}), allow_private=True)
    refused(listener.url("/x.png", host="multi.test"), policy, "address 0.0.0.0")
    assert listener.hits() == 0


def test_redirect_to_file_or_loop_refused(listener, media):
    policy = MediaPolicy(allow_hosts=LOCAL, allow_private=True, media_dir=media, max_redirects=3)
    target = (media / "sub" / "cat.png").as_uri()
    refused(listener.url("/redir?to=" + urllib.parse.quote(target)), policy, "redirect to scheme 'file'")
    refused(listener.url("/loop"), policy, "more than 3 redirects")
    assert listener.hits() == 1 + 4


def test_one_lookup_per_hop_and_connection_pinned_to_checked_address(make_listener, dns):
    # DNS rebinding: the first answer passes the check; any second lookup would fail the fetch.
    first, second = make_listener(), make_listener()
    dns.names.update({"rebind.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"]})
    policy = MediaPolicy(allow_hosts=frozenset({"rebind.test", "cdn.test"}), allow_private=True)
    target = second.url("/x.png", host="cdn.test")
    assert image_bytes(first.url("/redir?to=" + urllib.parse.quote(target), host="rebind.test"), policy) == PNG
    assert dns.calls == ["rebind.test", "cdn.test"]
    assert first.requests[0][1]["Host"] == f"rebind.test:{first.port}"
    assert second.requests[0][1]["Host"] == f"cdn.test:{second.port}"


def test_content_length_over_cap_is_413_before_reading(listener):
    policy = MediaPolicy(allow_hosts=LOCAL, allow_private=True, max_bytes=1000)
    refused(listener.url("/claims-big?n=200000000"), policy, "too large", "200000000", status=413)


def test_chunked_body_over_cap_is_413(listener):
    policy = MediaPolicy(allow_hosts=LOCAL, allow_private=True, max_bytes=10_000)
    refused(listener.url("/chunked?n=50000"), policy, "too large", status=413)
    assert image_bytes(listener.url("/chunked?n=9000"), policy) == b"x" * 9000


@pytest.mark.parametrize("path", ["/drip", "/stall"])
def test_slow_server_times_out(listener, path):
    start = time.monotonic()
    refused(listener.url(path), MediaPolicy(allow_hosts=LOCAL, allow_private=True, timeout_s=1), "timed out")
    assert time.monotonic() - start < 2


def test_non_200_status_refused(listener):
    refused(listener.url("/nothing-here"), MediaPolicy(allow_hosts=LOCAL, allow_private=True), "HTTP 404")


def test_https_certificate_is_verified(make_listener, tmp_path):
    if shutil.which("openssl") is None:
        pytest.fail("openssl command not found (apt-get install openssl): it makes the self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    listener = make_listener(tls=tls)
    policy = MediaPolicy(allow_hosts=frozenset({"localhost"}), allow_private=True)
    refused(listener.url("/x.png", host="localhost", scheme="https"), policy, "CERTIFICATE_VERIFY_FAILED")
    assert listener.requests == []  # the handshake failed: no request was ever sent
