"""The bytes behind one OpenAI `image_url`, fetched without turning the server into a proxy.

A chat content part `{"type": "image_url", "image_url": {"url": URL}}` may carry:

- `data:[<mediatype>][;base64],<data>`: always accepted. The decoded size is computed from the
  encoded length and refused (413) *before* anything is decoded. The media type may be empty,
  `image/*` or `application/octet-stream` (what clients actually send); any other type
  (`text/html`, `text/plain`, ...) is refused, since it cannot be an image and is the usual shape of
  a confused or hostile client. The bytes themselves are checked by `llava_local.image.load`.
- `http://` / `https://`: only for hosts in `MediaPolicy.allow_hosts` (`--allow-image-host`). The
  name is resolved once; every address it resolves to must be public unless `allow_private`; the
  socket then connects to that checked address (no second lookup, so DNS rebinding cannot swap
  it), TLS verifies the certificate for the hostname, and each redirect runs the whole check again.
  Body size and total time are capped. No proxy settings from the environment are used.
- `file://`: only under `MediaPolicy.media_dir` (`--media-dir`), after resolving every symlink.

Anything else (ftp, gopher, javascript, relative paths) is refused. Every refusal is a `MediaError`
whose `.status` is the HTTP status the server answers with (400, or 413 for too large) and whose
message names the `image_url` and the rule that refused it, never the content of what was read.

    from llava_local.server.media import MediaPolicy, image_bytes
    policy = MediaPolicy(allow_hosts=frozenset({"images.example.com"}), media_dir=Path("~/pics"))
    data = image_bytes(url, policy)          # then llava_local.image.load.load_image(data)

Known limit: `socket.getaddrinfo` has no timeout, so a slow resolver can outlast `timeout_s`.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from llava_local.errors import LlavaLocalError

MAX_URL_CHARS = 16 * 1024  # for http(s)/file URLs; data: URLs are capped by MediaPolicy.max_bytes
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024
DATA_MEDIA_TYPES = ("", "application/octet-stream", "binary/octet-stream")  # besides image/*


class MediaError(LlavaLocalError):
    """An `image_url` was refused or could not be fetched; `.status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaPolicy:
    allow_hosts: frozenset[str] = frozenset()  # hostnames whose http(s) URLs may be fetched; empty: none
    allow_private: bool = False  # also let those hosts resolve to loopback/private/link-local/reserved
    media_dir: Path | None = None  # file:// URLs only under this directory (resolved); None: no files
    max_bytes: int = 10 * 1024 * 1024  # per image: decoded data: payload, downloaded body or file
    timeout_s: float = 10.0  # whole download (every hop's connect + read) per image
    max_redirects: int = 3


def image_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The bytes of one image_url: data: (base64 or percent-encoded; size checked from the encoded length
    BEFORE decoding), http(s) (policy.allow_hosts), file:// (policy.media_dir). Anything else: MediaError."""
    if not isinstance(url, str):
        raise MediaError(f"image_url must be a string, got {type(url).__name__}")
    if url[:5].lower() == "data:":  # before any parsing: a data: URL may be hundreds of MB
        return _data_bytes(url, policy)
    if len(url) > MAX_URL_CHARS:
        raise MediaError(f"image_url is {len(url)} characters long; at most {MAX_URL_CHARS} unless it is data:")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _http_bytes(url, policy)
    if scheme == "file":
        return _file_bytes(url, policy)
    if not scheme:
        raise MediaError(f"image_url {_short(url)!r} has no scheme; expected data:, http(s):// or file://")
    raise MediaError(f"image_url scheme {scheme!r} is not supported; expected data:, http(s):// or file://")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _too_large(what: str, size: int | str, policy: MediaPolicy) -> MediaError:
    return MediaError(f"image_url {what} is too large: {size} bytes, the limit is {policy.max_bytes}", status=413)


# --- data: ---------------------------------------------------------------------------------------


def _data_bytes(url: str, policy: MediaPolicy) -> bytes:
    comma = url.find(",", 0, 1024)  # the header is short; never scan a huge payload for it
    if comma < 0:
        raise MediaError("image_url data: URL has no ',' between the media type and the data")
    params = url[5:comma].split(";")
    is_base64 = params[-1].strip().lower() == "base64"
    media_type = params[0].strip().lower()
    if not (media_type in DATA_MEDIA_TYPES or media_type.startswith("image/")):
        raise MediaError(f"image_url data: media type {_short(media_type, 60)!r} is not an image type")
    if is_base64:
        encoded_len = len(url) - comma - 1
        padding = 2 if url.endswith("==") else 1 if url.endswith("=") else 0
        size = encoded_len * 3 // 4 - padding
    else:
        size = len(url) - comma - 1 - 2 * url.count("%", comma)  # each %XX is one byte
    if size > policy.max_bytes:
        raise _too_large("data: payload", size, policy)
    payload = url[comma + 1 :]
    if not payload:
        raise MediaError("image_url data: URL is empty")
    if not is_base64:
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > policy.max_bytes:  # stray '%'s made the estimate low; decoding cost <= the URL's size
            raise _too_large("data: payload", len(data), policy)
        return data
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("image_url data: payload is not valid base64") from None


# --- file:// -------------------------------------------------------------------------------------


def _file_bytes(url: str, policy: MediaPolicy) -> bytes:
    if policy.media_dir is None:
        raise MediaError("image_url file:// URLs are off (start the server with --media-dir DIR to allow some)")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise MediaError(f"image_url file:// host {parts.netloc!r} is not allowed; only local files")
    raw_path = urllib.parse.unquote(parts.path)
    if "\x00" in raw_path or not os.path.isabs(raw_path):
        raise MediaError(f"image_url {_short(url)!r} is not an absolute file path")
    try:
        root = Path(policy.media_dir).expanduser().resolve(strict=True)
    except OSError:
        raise MediaError("image_url file:// refused: the server's --media-dir does not exist") from None
    # Resolve symlinks first, then compare: a link inside the media dir that points outside is refused.
    # Outside paths are refused whether or not they exist, so the answer reveals nothing about them.
    target = Path(raw_path).resolve()
    if os.path.commonpath([root, target]) != str(root):
        raise MediaError(f"image_url {_short(url)!r} is outside --media-dir")
    try:
        # O_NOFOLLOW: the resolved path has no links left, so one appearing now is a swap; refuse it.
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise MediaError(f"image_url {_short(url)!r} cannot be opened: {exc.strerror or 'error'}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > policy.max_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"image_url {_short(url)!r} is not a regular file")
        raise _too_large(_short(url), info.st_size, policy)
    with os.fdopen(fd, "rb") as f:
        data = f.read(policy.max_bytes + 1)  # the file may have grown since fstat
    if len(data) > policy.max_bytes:
        raise _too_large(_short(url), f"over {policy.max_bytes}", policy)
    return data


# --- http(s):// ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hop:
    """One checked request: where to connect (the checked address) and what to ask for."""

    url: str
    https: bool
    host: str  # ASCII (IDNA) hostname or IP literal: Host header and TLS server name
    port: int
    target: str  # path + query, percent-encoded
    addresses: tuple  # getaddrinfo results, every one checked


def _normal_host(host: str) -> str:
    """Lowercase, no trailing dot, IDNA (punycode) for non-ASCII names; raises UnicodeError."""
    host = host.strip().rstrip(".").lower()
    return host if host.isascii() else host.encode("idna").decode("ascii")


def _blocked_reason(address: str, policy: MediaPolicy) -> str | None:
    """Why this resolved address may not be fetched from, or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 scope id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    # 0.0.0.0 and :: reach the local host on Linux, multicast is never an image server: never allowed.
    if ip.is_unspecified or ip.is_multicast:
        return "unspecified or multicast"
    if policy.allow_private:
        return None
    for flag in ("loopback", "link_local", "private", "reserved"):
        if getattr(ip, f"is_{flag}"):
            return flag.replace("_", "-")
    return None if ip.is_global else "not public"


def _check_http_url(url: str, policy: MediaPolicy) -> _Hop:
    """Every rule for one http(s) URL, including the one DNS lookup; raises MediaError."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MediaError(f"image_url {_short(url)!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"image_url redirect to scheme {scheme or 'none'!r} is refused; only http(s)")
    if parts.username is not None or parts.password is not None:
        raise MediaError(f"image_url {_short(url)!r} carries credentials; they are not supported")
    if not parts.hostname:
        raise MediaError(f"image_url {_short(url)!r} has no host")
    try:
        host = _normal_host(parts.hostname)
        allowed = {_normal_host(h) for h in policy.allow_hosts}
    except UnicodeError:
        raise MediaError(f"image_url host {_short(parts.hostname, 60)!r} is not a valid hostname") from None
    if host not in allowed:
        raise MediaError(f"image_url host {host} is not allowed (start the server with --allow-image-host {host})")
    port = port or (443 if scheme == "https" else 80)
    try:
        addresses = tuple(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError) as exc:
        raise MediaError(f"image_url host {host} cannot be resolved: {exc}") from None
    if not addresses:
        raise MediaError(f"image_url host {host} resolved to no address")
    for *_, sockaddr in addresses:
        reason = _blocked_reason(sockaddr[0], policy)
        if reason:
            hint = " (start the server with --allow-private-image-hosts to allow it)"
            hint = "" if policy.allow_private or "multicast" in reason else hint
            raise MediaError(f"image_url host {host} resolves to {reason} address {sockaddr[0]}, refused{hint}")
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return _Hop(url, scheme == "https", host, port, path + ("?" + query if query else ""), addresses)


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a checked address, never to whatever the hostname resolves to now."""

    def __init__(self, hop: _Hop, timeout: float):
        super().__init__(hop.host, hop.port, timeout=timeout)
        self.hop = hop
        self.raw_sock: socket.socket | None = None  # kept: http.client drops .sock once the body is ours
        if hop.https:
            self.default_port = 443  # so the Host header omits :443

    def connect(self) -> None:
        errors = []
        for family, kind, proto, _, sockaddr in self.hop.addresses:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                if self.hop.https:  # verify the certificate for the name, not the address
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.hop.host)
            except OSError as exc:
                sock.close()
                if isinstance(exc, (TimeoutError, ssl.SSLError)):
                    raise
                errors.append(exc)
                continue
            self.sock = self.raw_sock = sock
            return
        raise errors[-1]


def _http_bytes(url: str, policy: MediaPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        hop = _check_http_url(url, policy)
        try:
            location, body = _fetch_hop(hop, policy, deadline)
        except TimeoutError:
            raise MediaError(f"image_url {_short(hop.url)!r} timed out after {policy.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise MediaError(f"image_url {_short(hop.url)!r} could not be fetched: {exc}") from None
        if location is None:
            return body
        url = urllib.parse.urljoin(hop.url, location)
    raise MediaError(f"image_url {_short(url)!r}: more than {policy.max_redirects} redirects")


def _remaining(deadline: float, hop: _Hop, policy: MediaPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaError(f"image_url {_short(hop.url)!r} timed out after {policy.timeout_s:g} s")
    return left


def _fetch_hop(hop: _Hop, policy: MediaPolicy, deadline: float) -> tuple[str | None, bytes]:
    """(redirect Location, b"") or (None, body) for one checked hop."""
    conn = _PinnedConnection(hop, timeout=_remaining(deadline, hop, policy))
    resp = None
    try:
        conn.request("GET", hop.target, headers={"User-Agent": "llava-local", "Accept": "image/*"})
        conn.raw_sock.settimeout(_remaining(deadline, hop, policy))
        resp = conn.getresponse()
        if resp.status in REDIRECT_STATUSES:
            location = resp.getheader("Location")
            if not location:
                raise MediaError(f"image_url {_short(hop.url)!r} answered HTTP {resp.status} without a Location")
            return location, b""
        if resp.status != 200:
            raise MediaError(f"image_url {_short(hop.url)!r} answered HTTP {resp.status} {_short(resp.reason, 60)}")
        if resp.length is not None and resp.length > policy.max_bytes:
            raise _too_large(f"{_short(hop.url)!r} body", resp.length, policy)
        body = bytearray()
        while True:
            conn.raw_sock.settimeout(_remaining(deadline, hop, policy))
            chunk = resp.read1(CHUNK_BYTES)  # one recv at most, so the deadline is checked often
            if not chunk:
                return None, bytes(body)
            body += chunk
            if len(body) > policy.max_bytes:
                raise _too_large(f"{_short(hop.url)!r} body", f"over {policy.max_bytes}", policy)
    finally:
        if resp is not None:
            resp.close()
        conn.close()
        if conn.raw_sock is not None:
            conn.raw_sock.close()
