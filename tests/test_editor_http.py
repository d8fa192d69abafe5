"""The editor over real HTTP: what a hostile web page (or a hostile client) sends is refused with a
status and a sentence, changes nothing, and prints no traceback; what the page sends works."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time

import numpy as np
import pytest
from PIL import Image
from support import tiny_model

from fastp2phd.data import render_scene
from fastp2phd.editing.http_handler import allowed_hosts, host_ok
from fastp2phd.editing.server import EditorApp, ObjectMask, Scene, serve
from fastp2phd.editing.strokes import stroke_region
from fastp2phd.editing.styles import grow_box

H, W = 32, 64
PAINT = json.dumps({"op": "paint", "points": [[1, 1], [1, 9]], "label": 21, "width": 3}).encode()


@pytest.fixture
def editor():
    scenes = [Scene('we"ird\r\nname', *render_scene(H, W, seed=0)[:2])]
    app = EditorApp(tiny_model(), scenes, [ObjectMask("box", 26, np.ones((4, 6), bool))])
    with serve(app, "127.0.0.1", 0) as server:
        yield app, server.server_address[1]


def exchange(port: int, request: bytes, timeout: float = 30, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """Send raw bytes from the address ``source``; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def request(method: str, path: str, port: int, headers: dict | None = None, body: bytes = b"") -> bytes:
    fields = {"Host": f"127.0.0.1:{port}"}
    if method == "POST":
        fields.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
    fields.update(headers or {})
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return f"{method} {path} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode() + body


def test_the_page_own_requests_work(editor):
    app, port = editor
    status, _, body = exchange(port, request("GET", "/api/info", port))
    assert status == 200 and json.loads(body)["size"] == [H, W]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        origin = f"http://{host}"
        status, _, body = exchange(port, request("POST", "/api/edit", port, {"Host": host, "Origin": origin,
                                                                            "Sec-Fetch-Site": "same-origin"}, PAINT))
        assert status == 200 and json.loads(body)["undo"] >= 1
    status, headers, _ = exchange(port, request("GET", "/api/download/image.png", port))
    assert status == 200 and headers["Content-Disposition"] == 'attachment; filename="we_ird__name_image.png"'


@pytest.mark.parametrize("headers, body, status, message", [
    ({"Host": "evil.example:{port}"}, PAINT, 403, "answers requests to 127.0.0.1"),  # DNS rebinding
    ({"Host": "127.0.0.1:1"}, PAINT, 403, "answers requests to 127.0.0.1"),
    ({"Host": None}, PAINT, 403, "answers requests to 127.0.0.1"),
    ({"Origin": "http://evil.example"}, PAINT, 403, "may not change this editor"),
    ({"Origin": "null"}, PAINT, 403, "may not change this editor"),
    ({"Sec-Fetch-Site": "cross-site"}, PAINT, 403, "other sites"),
    ({"Content-Type": "text/plain"}, PAINT, 415, "application/json"),  # what a form of another page can send
    ({"Content-Type": None}, PAINT, 415, "application/json"),
    ({"Content-Length": "-1"}, PAINT, 400, "Content-Length"),
    ({"Content-Length": "abc"}, PAINT, 400, "Content-Length"),
    ({"Content-Length": None}, PAINT, 400, "Content-Length"),
    ({"Content-Length": str(2 << 20)}, b"", 413, "more than"),  # announced, never sent
    ({"Transfer-Encoding": "chunked"}, PAINT, 400, "chunked"),
    ({}, b"[" * 100_000 + b"]" * 100_000, 400, "nests too deeply"),
    ({}, b'{"op": "paint", "points": [[1, 1]], "label": 21, "width": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    ({}, b'{"op": "paint", "points": [[1, 1]], "label": 21, "width": 1' + b"0" * 400 + b"}", 400, "from 1 to 128"),
    ({}, b'{"op": "paint", "points": [[1, 1]], "label": 21, "width": 1e400}', 400, "must be an integer"),
    ({}, b"\xff\xfe{}", 400, "not valid JSON"),
])
def test_refused_posts_change_nothing_and_print_nothing(editor, capfd, headers, body, status, message):
    app, port = editor
    headers = {k: v.format(port=port) if v else v for k, v in headers.items()}
    before = app.session.label.clone()
    got, _, answer = exchange(port, request("POST", "/api/edit", port, headers, body))
    assert got == status and message in json.loads(answer)["error"]
    assert app.session.label.equal(before) and not app.session.undo_stack
    assert "Traceback" not in capfd.readouterr().err


def test_foreign_hosts_cannot_read_either(editor):
    app, port = editor
    for path in ("/", "/api/info", "/api/image.png", "/api/download/label_ids.png"):
        status, _, body = exchange(port, request("GET", path, port, {"Host": f"attacker.example:{port}"}))
        assert status == 403 and b"PNG" not in body and b"label-canvas" not in body


@pytest.mark.parametrize("path, status", [("/api/object-1.png", 404), ("/api/object0.png", 200), ("/nowhere", 404),
                                          ("/api/download/..%2Fimage.png", 404)])
def test_gets_are_validated(editor, path, status):
    _, port = editor
    assert exchange(port, request("GET", path, port))[0] == status


def test_a_get_with_a_body_is_refused(editor):
    _, port = editor
    status, _, body = exchange(port, request("GET", "/api/info", port, {"Content-Length": "5"}, b"hello"))
    assert status == 400 and "no body" in json.loads(body)["error"]


def test_cancelled_requests_print_no_traceback(editor, capfd):
    app, port = editor
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        sock.sendall(request("GET", "/api/image.png", port))
        sock.close()
    time.sleep(0.5)
    assert exchange(port, request("GET", "/api/info", port))[0] == 200
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("listen, good, bad", [
    ("127.0.0.1", ["127.0.0.1:8765", "localhost:8765", "LOCALHOST:8765"], ["127.0.0.1", "evil.example:8765",
                                                                          "127.0.0.1:8766", "127.0.0.1.evil:8765"]),
    ("::1", ["[::1]:8765", "localhost:8765"], ["[::2]:8765", "::1:8765"]),
    ("0.0.0.0", ["192.168.1.7:8765", "[fe80::1]:8765", "localhost:8765"], ["rebind.example:8765", "192.168.1.7:80"]),
])
def test_allowed_hosts(listen, good, bad):
    allowed = allowed_hosts(listen, 8765)
    assert all(host_ok(h, allowed, 8765) for h in good)
    assert not any(host_ok(h, allowed, 8765) for h in bad)


@pytest.mark.parametrize("norm", ["instance", "batch"])  # a global generator, and a local one (regenerates crops)
def test_an_edit_answers_with_the_patches_that_bring_the_page_up_to_date(norm):
    scenes = [Scene(f"s{seed}", *render_scene(128, 256, seed=seed)[:2]) for seed in (4, 5)]
    app = EditorApp(tiny_model(norm=norm), scenes, [])
    names = ("image", "label_colours", "outlines")

    def get(name: str) -> np.ndarray:
        status, kind, payload = app.handle("GET", f"/api/{name}.png", b"")
        assert (status, kind) == (200, "image/png")
        return np.array(Image.open(io.BytesIO(payload)))

    def post(path: str, body: dict) -> dict:
        status, _, payload = app.handle("POST", path, json.dumps(body).encode())
        assert status == 200, payload
        return json.loads(payload)

    shown, view = {name: get(name) for name in names}, app.info()["view"]  # what the page holds after loading
    ys, xs = np.nonzero((scenes[0].inst >= 26000) & (scenes[0].inst < 27000))
    car = [int(ys[len(ys) // 2]), int(xs[len(xs) // 2])]
    edits = [{"op": "paint", "points": [[20, 30], [24, 60]], "label": 8, "width": 6},
             {"op": "change_label", "y": car[0], "x": car[1], "label": 28}, {"op": "undo"}, {"op": "redo"},
             {"op": "change_label", "y": car[0], "x": car[1], "label": 28},  # already a bus: nothing changes
             {"op": "paint", "points": [[127, 255]], "label": 11, "width": 3}, {"op": "reset"}]
    for body in edits:
        update = post("/api/edit", body)["view"]
        assert update["from"] == view and update["to"] == view + (body is not edits[4])  # a no-op keeps the version
        view = update["to"]
        for patch in update["patches"]:
            y0, y1, x0, x1 = patch["box"]
            picture = np.array(Image.open(io.BytesIO(base64.b64decode(patch["url"].split(",", 1)[1]))))
            assert picture.shape[:2] == (y1 - y0, x1 - x0)
            shown[patch["view"]][y0:y1, x0:x1] = picture
        for name in names:
            assert np.array_equal(shown[name], get(name)), (body, name)
        if body["op"] == "paint" and body["width"] == 6:
            boxes = {patch["view"]: patch["box"] for patch in update["patches"]}
            assert (boxes["image"] == [0, 128, 0, 256]) == (norm == "instance")  # a local generator: the reach only
            stroke_box = stroke_region([(20, 30), (24, 60)], 6, 128, 256)[0]
            assert boxes["label_colours"] == list(grow_box(stroke_box, 1, 128, 256))  # the stroke and its outlines
        assert (not update["patches"]) == (body is edits[4])  # only the no-op sends nothing
    assert post("/api/scene", {"index": 1})["view"] == view + 1  # another scene: the page fetches it whole
