"""The web editor's HTTP request handler (``make_handler``): http.server's parsing of a request
that ``EditorServer`` (``server.py``) has read whole, the HTTP layer's checks, and the answer.

It answers only requests whose ``Host`` is the address the editor listens on (DNS rebinding
gets 403), refuses state-changing requests from another ``Origin`` or site (403), takes JSON
bodies only as ``application/json`` (415: so no plain form of another page can post one) with
a valid ``Content-Length`` (400, or 413 over ``MAX_BODY``), and hands the rest to
``EditorApp.handle`` (``app.py``). The answer must be sent within ``SEND_DEADLINE``.
"""
from __future__ import annotations

import io
import ipaddress
import json
import re
import socket
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlparse

from .app import EditorApp, RequestError, _short

__all__ = ["MAX_BODY", "SEND_DEADLINE", "allowed_hosts", "host_ok", "make_handler"]

MAX_BODY = 1 << 20  # bytes: a stroke of MAX_STROKE_POINTS points fits easily
SEND_DEADLINE = 30.0  # seconds a client may take to read its answer


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The ``Host`` header values a request to the editor at host:port may carry; None means any IP
    literal, ``localhost`` or this machine's name (when it listens on every address)."""
    if host in ("", "0.0.0.0", "::"):
        return None
    names = {"localhost"} if host in ("127.0.0.1", "::1", "localhost") else set()
    names.add(f"[{host}]" if ":" in host else host)
    if host == "localhost":
        names.add("127.0.0.1")
    values = {f"{name}:{port}" for name in names}
    if port == 80:
        values |= names
    return frozenset(values)


def host_ok(value: str, allowed: frozenset[str] | None, port: int) -> bool:
    value = value.strip().lower()
    if allowed is not None:
        return value in allowed
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?", value)
    if match is None or int(match.group(2) or 80) != port:
        return False
    name = match.group(1).strip("[]")
    if name in ("localhost", socket.gethostname().lower(), socket.getfqdn().lower()):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def make_handler(app: EditorApp, listen_host: str, port: int):
    """The ``BaseHTTPRequestHandler`` class that answers requests to ``app`` listening on listen_host:port."""
    hosts = allowed_hosts(listen_host, port)

    class Handler(BaseHTTPRequestHandler):
        """Answers one request that ``EditorServer`` has already read whole (``self.request`` is its
        ``Connection``: ``sock``, ``data``, and ``answer_by``, when the answer is due) by
        ``app.handle``: the parsing and its errors (400, 414, 431, 501, 505) are http.server's."""

        server_version = "fastp2phd-editor"
        default_request_version = "HTTP/1.0"  # so even an error about a mangled request line has a status line

        def setup(self):
            self.connection = self.request.sock
            self.rfile = io.BytesIO(self.request.data)
            self.wfile = _DeadlineWriter(self.connection, time.monotonic() + SEND_DEADLINE)

        def finish(self):  # EditorServer closes the connection
            pass

        def _check(self, method: str) -> bytes:
            """The body of a request that passes the HTTP layer's checks; raises RequestError otherwise."""
            host = self.headers.get("Host")
            if host is None or not host_ok(host, hosts, port):
                raise RequestError(f"this editor answers requests to {listen_host}:{port} only, not to host "
                                   f"{_short(host)}", 403)
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                raise RequestError("chunked request bodies are not accepted; send a Content-Length")
            if len(self.headers.get_all("Content-Length", ())) > 1:
                raise RequestError("send one Content-Length header, not several")
            if method == "GET":
                if length not in (None, "0"):
                    raise RequestError("GET requests take no body")
                return b""
            origin = self.headers.get("Origin")
            if origin is not None and origin.strip().lower() != f"http://{host.strip().lower()}":
                raise RequestError(f"requests from {_short(origin)} may not change this editor; open it at "
                                   f"http://{host.strip()}/", 403)
            if self.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                raise RequestError("requests from other sites may not change this editor", 403)
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise RequestError(f"send the request body as JSON with Content-Type: application/json, not "
                                   f"{_short(kind or 'none')}", 415)
            if length is None or not re.fullmatch(r"\d{1,12}", length.strip()):
                raise RequestError(f"a POST needs a Content-Length of 0 or more bytes, got {_short(length)}")
            if int(length) > MAX_BODY:
                raise RequestError(f"the request body is {int(length)} bytes, more than the {MAX_BODY} allowed", 413)
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                raise RequestError("the request body ended before its Content-Length")
            return body

        def _respond(self, method: str) -> None:
            try:
                body = self._check(method)
            except RequestError as refused:
                status, kind, payload = refused.status, "application/json", json.dumps({"error": str(refused)}).encode()
            else:
                wait = self.request.answer_by - time.monotonic()
                status, kind, payload = app.handle(method, self.path, body, wait=max(wait, 0.0))
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            if status == 200 and urlparse(self.path).path.startswith("/api/download/"):
                name = urlparse(self.path).path[len("/api/download/"):-len(".png")]
                self.send_header("Content-Disposition", f'attachment; filename="{app.download_name(name)}"')
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._respond("GET")

        def do_POST(self):  # noqa: N802
            self._respond("POST")

        def log_message(self, format, *args):  # quiet: the page shows what happened
            pass

    return Handler


class _DeadlineWriter:
    """The handler's ``wfile``: sends everything by ``deadline`` or raises TimeoutError, so a client
    that reads its answer a byte at a time cannot hold a worker."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def write(self, data: bytes) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client did not read its answer in time")
        self.sock.settimeout(left)
        self.sock.sendall(data)  # (the timeout bounds the whole sendall)
        return len(data)

    def flush(self):
        pass
