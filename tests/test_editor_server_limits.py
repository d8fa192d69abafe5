"""The editor's server under abuse: bursts, slowloris, floods and malformed requests. Every client
gets a well-formed answer (or a clean close) within seconds, honest clients stay served, and no
traceback reaches the terminal. The load runs in one thread with non-blocking sockets, so each
client's time is the server's, not the test's thread scheduling."""
from __future__ import annotations

import json
import re
import selectors
import socket
import threading
import time

import pytest
from support import tiny_model
from test_editor_http import H, PAINT, W, exchange, request

from fastp2phd.data import render_scene
from fastp2phd.editing import server as editor_server
from fastp2phd.editing.server import EditorApp, Scene, serve

ANSWER_BOUND = 5.0  # seconds: the promise for every client under load


@pytest.fixture
def editor(capfd):
    app = EditorApp(tiny_model(), [Scene("s", *render_scene(H, W, seed=0)[:2])], [])
    with serve(app, "127.0.0.1", 0) as server:
        yield app, server.server_address[1]
    assert "Traceback" not in capfd.readouterr().err


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def read_answer(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def well_formed(data: bytes, head_request: bool = False) -> int:
    """The status of one whole HTTP answer (its body as long as its Content-Length says, nothing after;
    no body at all for a HEAD request)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    assert sep and match, data[:200]
    length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
    assert length and (body == b"" if head_request else int(length.group(1)) == len(body)), data[:200]
    return int(match.group(1))


def many_at_once(port: int, requests: list[tuple[bytes, str]], limit: float = 30) -> list[tuple[int, float]]:
    """Sends every request on its own connection (from the given source address) at once; (status, seconds
    from connecting (so a full listen backlog counts) to the end of its answer) per request, status 0 for
    a connection closed without an answer."""
    selector = selectors.DefaultSelector()
    results: list[tuple[int, float] | None] = [None] * len(requests)
    for i, (raw, source) in enumerate(requests):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        start = time.monotonic()
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE, [i, raw, b"", start])
    end = time.monotonic() + limit
    while selector.get_map() and time.monotonic() < end:
        for key, events in selector.select(timeout=0.1):
            state, sock = key.data, key.fileobj
            if events & selectors.EVENT_WRITE:  # connected: send the whole request (small: fits the buffer)
                sock.sendall(state[1])
                selector.modify(sock, selectors.EVENT_READ, state)
                continue
            try:
                chunk = sock.recv(65536)
            except ConnectionError:
                chunk = b""
            state[2] += chunk
            if not chunk:
                results[state[0]] = (well_formed(state[2]) if state[2] else 0, time.monotonic() - state[3])
                selector.unregister(sock)
                sock.close()
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    assert all(r is not None for r in results), f"{results.count(None)} clients got no answer in {limit} s"
    return results


def assert_answered(results: list[tuple[int, float]]) -> None:
    statuses = [status for status, _ in results]
    slowest = max(seconds for _, seconds in results)
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert slowest < ANSWER_BOUND, f"the slowest client waited {slowest:.2f} s"
    assert statuses.count(200) >= len(statuses) // 2, f"only {statuses.count(200)} of {len(statuses)} got 200"


def slowloris(port: int, sources: list[str]) -> list[socket.socket]:
    """Connections that start a request and never finish it."""
    socks = [connect(port, source) for source in sources]
    for sock in socks:
        sock.sendall(b"POST /api/edit HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return socks


def test_a_burst_of_200_clients_is_answered_within_5_seconds(editor):
    _, port = editor
    results = many_at_once(port, [(request("GET", "/api/info", port), "127.0.0.1")] * 200)
    assert_answered(results)


@pytest.mark.parametrize("spread", [False, True], ids=["one address", "spread"])
def test_a_slowloris_of_64_connections_locks_nobody_out(editor, spread):
    _, port = editor
    held = slowloris(port, [f"127.0.0.{2 + i}" if spread else "127.0.0.1" for i in range(64)])
    time.sleep(0.3)
    try:
        for sock in held:  # the trickle that kept the old per-read timeout from ever firing
            sock.sendall(b"X")
        assert_answered(many_at_once(port, [(request("GET", "/api/info", port), "127.0.0.1")] * 100))
    finally:
        for sock in held:
            sock.close()


def test_the_whole_request_has_a_deadline_however_it_trickles(monkeypatch, editor):
    monkeypatch.setattr(editor_server, "REQUEST_DEADLINE", 1.0)
    _, port = editor
    start = time.monotonic()
    with connect(port) as sock:
        sock.settimeout(0.2)
        answer = b""
        for byte in request("GET", "/api/info", port)[:-4]:  # never the final blank line
            sock.sendall(bytes([byte]))
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                pass
        sock.settimeout(10)
        answer += read_answer(sock)
    assert well_formed(answer) == 408 and b"within 1 seconds" in answer
    assert time.monotonic() - start < 3


def test_a_client_over_its_connection_limit_gets_503_at_once(monkeypatch, editor):
    monkeypatch.setattr(editor_server, "MAX_PER_CLIENT", 4)
    monkeypatch.setattr(editor_server, "REQUEST_DEADLINE", 2.0)
    _, port = editor
    held = slowloris(port, ["127.0.0.1"] * 4)
    time.sleep(0.2)
    try:
        start = time.monotonic()
        status, _, body = exchange(port, request("GET", "/api/info", port))
        assert status == 503 and "busy" in json.loads(body)["error"] and time.monotonic() - start < 1
        assert exchange(port, request("GET", "/api/info", port), source="127.0.0.2")[0] == 200  # others are served
        for sock in held:  # the deadline frees the slots
            assert well_formed(read_answer(sock)) == 408
        assert exchange(port, request("GET", "/api/info", port))[0] == 200
    finally:
        for sock in held:
            sock.close()


def test_requests_waiting_for_a_busy_generator_get_503_in_time(monkeypatch, editor):
    monkeypatch.setattr(editor_server, "ANSWER_WITHIN", 0.5)
    monkeypatch.setattr(editor_server, "MAX_WORKERS", 1)
    app, port = editor
    generating = threading.Event()
    app.model_thread.submit(generating.wait)  # a long generation: one request waits for the model, the other for a worker
    try:
        results = many_at_once(port, [(request("GET", "/api/info", port), "127.0.0.1")] * 2)
    finally:
        generating.set()
    assert [status for status, _ in results] == [503, 503] and max(s for _, s in results) < 2
    assert exchange(port, request("GET", "/api/info", port))[0] == 200


def test_a_refused_body_does_not_reset_its_answer(editor):
    _, port = editor
    body = b"{" + b" " * (2 << 20) + b"}"  # over MAX_BODY: refused after the head, then drained
    with connect(port) as sock:
        sock.sendall(request("POST", "/api/edit", port, body=body))
        answer = read_answer(sock)
    assert well_formed(answer) == 413


def long_headers(port: int, count: int, size: int) -> bytes:
    return request("GET", "/api/info", port, {f"X-{i}": "a" * size for i in range(count)})


PROBES = [  # (what, the raw request for a port, the status it gets; None: a clean close)
    ("too many query fields", lambda p: request("GET", "/api/info?" + "&" * 20, p), 400),
    ("too many query fields, unknown path", lambda p: request("GET", "/nowhere?" + "a=1&" * 20, p), 400),
    ("too many query fields in a POST", lambda p: request("POST", "/api/edit?" + "&" * 20, p, body=PAINT), 400),
    ("bad percent-encoding", lambda p: request("GET", "/api/instance?y=%ZZ&x=%C3%28", p), 400),
    ("a NUL and a non-ASCII digit", lambda p: request("GET", "/api/instance?y=%00&x=\u0661", p), 400),
    ("a percent-encoded non-UTF-8 path", lambda p: request("GET", "/api/%ff%fe.png", p), 404),
    ("a raw non-UTF-8 path", lambda p: b"GET /api/\xff\xfe.png HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % p, 404),
    ("a raw non-UTF-8 query", lambda p: b"GET /api/info?y=\xc3\x28 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % p, 200),
    ("an absolute URL that does not parse", lambda p: request("GET", "http://[::1/api/info", p), 400),
    ("HEAD", lambda p: request("HEAD", "/api/info", p), 501),
    ("OPTIONS", lambda p: request("OPTIONS", "*", p), 501),
    ("an unknown method", lambda p: request("BREW", "/pot", p), 501),
    ("a 70 kB request line", lambda p: request("GET", "/" + "a" * 70_000, p), 414),
    ("a request line that never ends", lambda p: b"GET /" + b"a" * 70_000, 414),
    ("200 headers", lambda p: long_headers(p, 200, 10), 431),
    ("a 70 kB header", lambda p: long_headers(p, 1, 70_000), 431),
    ("a head that never ends", lambda p: long_headers(p, 90, 1000)[:-4], 431),
    ("a 30-digit Content-Length", lambda p: request("POST", "/api/edit", p, {"Content-Length": "9" * 30}, PAINT), 400),
    ("a huge Content-Length", lambda p: request("POST", "/api/edit", p, {"Content-Length": "999999999999"}, PAINT), 413),
    ("a negative Content-Length", lambda p: request("POST", "/api/edit", p, {"Content-Length": "-5"}, PAINT), 400),
    ("a signed Content-Length", lambda p: request("POST", "/api/edit", p, {"Content-Length": "+5"}, PAINT), 400),
    ("two Content-Lengths", lambda p: request("POST", "/api/edit", p).replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n") + PAINT, 400),
    ("an HTTP/0.9 request", lambda p: b"GET /api/info\r\n\r\n", 403),
    ("HTTP/2", lambda p: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("TLS or garbage", lambda p: b"\x00\xff\x16\x03\x01" * 40 + b"\r\n\r\n", 400),
    ("a four-word request line", lambda p: b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    ("blank lines only", lambda p: b"\r\n\r\n", None),
]


@pytest.mark.parametrize("raw, status", [pytest.param(raw, status, id=what) for what, raw, status in PROBES])
def test_malformed_requests_get_a_well_formed_answer(editor, raw, status):
    _, port = editor
    sent = raw(port)
    with connect(port) as sock:
        sock.sendall(sent)
        answer = read_answer(sock)
    if status is None:
        assert answer == b""
    else:
        assert well_formed(answer, head_request=sent.startswith(b"HEAD ")) == status
    assert exchange(port, request("GET", "/api/info", port))[0] == 200


def test_an_unfinished_body_gets_400_when_the_client_stops_sending(editor):
    _, port = editor
    with connect(port) as sock:
        sock.sendall(request("POST", "/api/edit", port, {"Content-Length": "100"}, PAINT[:10]))
        sock.shutdown(socket.SHUT_WR)  # half-open: the client will only read now
        answer = read_answer(sock)
    assert well_formed(answer) == 400 and b"ended before its Content-Length" in answer


def test_an_unfinished_body_gets_408_when_the_client_goes_quiet(monkeypatch, editor):
    monkeypatch.setattr(editor_server, "REQUEST_DEADLINE", 1.0)
    _, port = editor
    with connect(port) as sock:
        sock.sendall(request("POST", "/api/edit", port, {"Content-Length": "100"}, PAINT[:10]))
        assert well_formed(read_answer(sock)) == 408


def test_pipelined_requests_get_the_first_answer_then_a_clean_close(editor):
    _, port = editor
    with connect(port) as sock:
        sock.sendall(request("GET", "/api/info", port) * 3)
        assert well_formed(read_answer(sock)) == 200


def test_clients_that_vanish_mid_request_leave_the_server_serving(editor):
    _, port = editor
    for raw in (b"GET /api/info HTTP/1.1\r\n", request("GET", "/api/image.png", port)):
        for _ in range(20):
            sock = connect(port)
            sock.sendall(raw)
            sock.close()
    time.sleep(0.2)
    assert exchange(port, request("GET", "/api/info", port))[0] == 200


def test_the_server_stops_promptly_with_connections_open():
    app = EditorApp(tiny_model(), [Scene("s", *render_scene(H, W, seed=0)[:2])], [])
    server = serve(app, "127.0.0.1", 0)
    held = slowloris(server.server_address[1], ["127.0.0.1"] * 8)
    start = time.monotonic()
    stopper = threading.Thread(target=server.__exit__, args=(None, None, None))
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive() and time.monotonic() - start < 2
    for sock in held:
        sock.settimeout(5)
        try:  # closed, not left hanging: an end of stream, or a reset (the client's half-sent request was unread)
            assert read_answer(sock) == b""
        except ConnectionResetError:
            pass
        sock.close()


def test_a_request_sent_in_pieces_within_the_deadline_is_answered(editor):
    app, port = editor
    raw = request("POST", "/api/edit", port, body=PAINT)
    head_end = raw.index(b"\r\n\r\n")
    with connect(port) as sock:
        for piece in (raw[:10], raw[10:head_end + 2], raw[head_end + 2:head_end + 10], raw[head_end + 10:-5], raw[-5:]):
            sock.sendall(piece)
            time.sleep(0.05)
        assert well_formed(read_answer(sock)) == 200
    assert len(app.session.undo_stack) == 1


def test_bodies_held_at_once_are_bounded(monkeypatch, editor):
    monkeypatch.setattr(editor_server, "MAX_BUFFERED", 100_000)
    _, port = editor
    announced = {"Content-Length": "500000"}
    with connect(port) as first, connect(port) as second:
        first.sendall(request("POST", "/api/edit", port, announced, b" " * 90_000))  # held: its body is unfinished
        time.sleep(0.2)
        second.sendall(request("POST", "/api/edit", port, announced, b" " * 20_000))
        assert well_formed(read_answer(second)) == 503
        first.close()
        time.sleep(0.2)
        assert exchange(port, request("POST", "/api/edit", port, body=PAINT))[0] == 200  # the memory is back
