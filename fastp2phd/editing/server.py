"""The web editor: a single page served on 127.0.0.1 over one EditSession per scene.

``fastp2phd edit --name NAME`` loads the run's generator (and clusters), the test
scenes of its dataset and a few object masks, and serves the page and a small JSON
API. A lock lets one request use the generator at a time, so concurrent clicks queue
instead of interleaving.

Three layers keep it safe on a machine whose browser visits other sites:

* the server (``EditorServer``) reads each request whole in one thread before a worker
  answers it, so slow, idle or flooding clients get 408 or 503 within seconds and
  never lock out the others (see its docstring and the limits below);
* the HTTP handler (``make_handler``, http.server's request parsing) answers only
  requests whose ``Host`` is the address the editor listens on (DNS rebinding gets
  403), refuses state-changing requests from another ``Origin`` (403), takes JSON
  bodies only as ``application/json`` (415: so no plain form of another page can post
  one) with a valid ``Content-Length`` (400, or 413 over ``MAX_BODY``);
* ``EditorApp.handle`` validates every request: bad JSON, unknown operations,
  coordinates, labels or strokes out of range answer 400 with a sentence saying why,
  and the scene is left unchanged.
"""
from __future__ import annotations

import base64
import io
import ipaddress
import json
import queue
import re
import selectors
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image

from ..data import CITYSCAPES_CLASSES, THING_CLASSES, class_of_instance, label_palette
from ..errors import InvalidArgumentError, Pix2PixHDError
from ..files import remove_leftover_temporaries
from ..specs import DataSpec
from .session import MAX_STROKE_POINTS, EditSession

MAX_BODY = 1 << 20  # bytes: a stroke of MAX_STROKE_POINTS points fits easily
MAX_QUERY_FIELDS = 8  # the API's queries have two
# What one client, or many, can hold (EditorServer): beyond the limits a client gets 503 at once.
REQUEST_DEADLINE = 10.0  # seconds from connecting to the end of the request (not per read: a trickle counts too)
ANSWER_WITHIN = 4.0  # seconds a whole request may wait for a worker and the generator before it gets 503
SEND_DEADLINE = 30.0  # seconds a client may take to read its answer
LINGER = 2.0  # seconds the server reads (and drops) what a client still sends after its answer
MAX_WORKERS = 16  # requests answered at once (threads)
MAX_CONNECTIONS = 512  # connections open at once (being read or answered); with the lingering ones well
MAX_LINGERING = 256  # under the usual limit of 1024 file descriptors
MAX_PER_CLIENT = 384  # of them from one address (on 127.0.0.1 every local client shares it)
MAX_HEAD = 64 << 10  # bytes of request line and headers
MAX_BUFFERED = 64 << 20  # bytes of requests held at once, all connections together
BACKLOG = 1024  # connections the kernel queues before the server accepts them (capped by net.core.somaxconn)
DOWNLOADS = ("image", "label_ids", "instance_ids", "label_colours")  # what /api/download/<name>.png offers


@dataclass
class Scene:
    name: str
    label: np.ndarray  # (H, W) class ids
    inst: np.ndarray  # (H, W) instance ids


@dataclass
class ObjectMask:
    name: str
    label: int
    mask: np.ndarray  # (h, w) bool


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # a few ms, not a dozen: it is local
    return buffer.getvalue()


def data_url(array: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode()


def file_name(text: str) -> str:
    """``text`` with everything but letters, digits, '.', '_' and '-' replaced: safe in a header and a path."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "scene"


def save_name(scene_name: str) -> str:
    """Where a scene is saved, inside each ``test_*`` folder: its path in the dataset, each part made safe."""
    return "/".join(file_name(part) for part in scene_name.split("/") if part not in ("", ".", ".."))


class RequestError(ValueError):
    """A request the editor refuses; its message is sent back with ``status``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class EditorApp:
    """The editor's state and request handling, independent of the HTTP plumbing (so tests can call it).

    ``trained_classes`` are the class ids the model was trained on (see
    ``fastp2phd.train_state.trained_classes``); when None they are guessed from the
    clusters and the scenes. ``save_dir`` is where "save" writes scenes, as a dataset
    ``fastp2phd test`` reads (``test_command`` is shown to say how).
    """

    def __init__(self, model, scenes: list[Scene], objects: list[ObjectMask], seed: int = 0, *,
                 trained_classes: Iterable[int] | None = None, save_dir: str | Path | None = None,
                 test_command: str | None = None):
        if not scenes:
            raise InvalidArgumentError("the editor needs at least one scene")
        self.model = model
        self.scenes = scenes
        self.objects = objects
        self.seed = seed
        self.save_dir = None if save_dir is None else Path(save_dir)
        if self.save_dir is not None and self.save_dir.is_dir():  # a save killed midway: finish it, or drop its pieces
            remove_leftover_temporaries(self.save_dir, recursive=True)
        self.test_command = test_command
        self.lock = threading.Lock()
        label_nc = model.spec.label_nc
        names = [name for name, _ in CITYSCAPES_CLASSES] if label_nc == len(CITYSCAPES_CLASSES) else [
            f"class {i}" for i in range(label_nc)]
        clusters = model.clusters or {}
        if trained_classes is None:
            self.trained_source = "guessed from the clusters and the scenes (the run did not record its classes)"
            seen = set(int(c) for c in clusters)
            for scene in scenes:
                seen.update(int(c) for c in np.unique(scene.label))
            trained_classes = seen
        else:
            self.trained_source = "recorded during training"
        trained = set(int(c) for c in trained_classes)
        self.labels = [{"id": i, "name": names[i], "color": "#%02x%02x%02x" % tuple(int(c) for c in color),
                        "thing": i in THING_CLASSES, "trained": i in trained,
                        "styles": len(clusters[i]) if model.spec.uses_features and i in clusters else 0}
                       for i, color in enumerate(label_palette(label_nc))]
        self.sessions: dict[int, EditSession] = {}
        self.scene_index = 0
        self.session = self._open(0)

    def _open(self, index: int) -> EditSession:
        if index not in self.sessions:
            scene = self.scenes[index]
            self.sessions[index] = EditSession(self.model, scene.label, scene.inst, seed=self.seed)
        return self.sessions[index]

    # ------------------------------------------------------------------ API
    def info(self) -> dict:
        return {
            "scenes": [s.name for s in self.scenes], "scene": self.scene_index,
            "size": [self.session.height, self.session.width], "labels": self.labels,
            "trained_source": self.trained_source, "features": self.session.use_features,
            "can_save": self.save_dir is not None,
            "objects": [{"index": i, "name": o.name, "label": o.label, "height": int(o.mask.shape[0]),
                         "width": int(o.mask.shape[1])} for i, o in enumerate(self.objects)],
            **self._history(),
        }

    def _history(self) -> dict:
        s = self.session
        return {"undo": len(s.undo_stack), "redo": len(s.redo_stack),
                "unsaved": [i for i, session in sorted(self.sessions.items()) if session.unsaved]}

    def load_scene(self, body: dict) -> dict:
        index = _int(body.get("index"), "index")
        if not 0 <= index < len(self.scenes):
            raise RequestError(f"scene {index} does not exist; there are {len(self.scenes)}")
        start = time.perf_counter()
        old = self.session
        if not (old.undo_stack or old.redo_stack or old.unsaved):  # nothing to keep: free its memory
            del self.sessions[self.scene_index]
        self.session = self._open(index)
        self.scene_index = index
        self.session.image()
        return {"ms": (time.perf_counter() - start) * 1e3, **self.info()}

    def edit(self, body: dict) -> dict:
        op = body.get("op")
        s = self.session
        start = time.perf_counter()
        try:
            if op == "change_label":
                s.change_label(_int(body.get("y"), "y"), _int(body.get("x"), "x"), _int(body.get("label"), "label"))
            elif op == "paint":
                points = body.get("points")
                if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
                    raise RequestError("points must be a list of [y, x] pairs")
                if len(points) > MAX_STROKE_POINTS:
                    raise RequestError(f"a stroke has at most {MAX_STROKE_POINTS} points, this one has {len(points)}; "
                                       "paint it in several strokes")
                s.paint([(_int(y, "y"), _int(x, "x")) for y, x in points], _int(body.get("label"), "label"),
                        _int(body.get("width", 8), "width"))
            elif op == "add_object":
                index = _int(body.get("object"), "object")
                if not 0 <= index < len(self.objects):
                    raise RequestError(f"object {index} does not exist; there are {len(self.objects)}")
                obj = self.objects[index]
                style = None if body.get("style") is None else _int(body.get("style"), "style")
                s.add_object(obj.mask, _int(body.get("y"), "y"), _int(body.get("x"), "x"),
                             _int(body.get("label", obj.label), "label"), style)
            elif op == "remove_object":
                s.remove_object(_int(body.get("y"), "y"), _int(body.get("x"), "x"))
            elif op == "set_style":
                s.set_style(_int(body.get("y"), "y"), _int(body.get("x"), "x"), _int(body.get("style"), "style"))
            elif op == "undo":
                s.undo()
            elif op == "redo":
                s.redo()
            elif op == "reset":
                s.reset()
            else:
                raise RequestError(f"unknown operation {_short(op)}; use change_label, paint, add_object, "
                                   "remove_object, set_style, undo, redo or reset")
        except RequestError:
            raise
        except ValueError as exc:  # the session refused the edit and changed nothing
            raise RequestError(str(exc)) from None
        s.image()  # regenerate now, so the time covers edit -> new image
        return {"ms": (time.perf_counter() - start) * 1e3, **self._history()}

    def save(self) -> dict:
        if self.save_dir is None:
            raise RequestError("this editor was started without a folder to save into")
        name = save_name(self.scenes[self.scene_index].name)
        twins = [s.name for i, s in enumerate(self.scenes) if i != self.scene_index and save_name(s.name) == name]
        if twins:  # e.g. "a b" and "a_b": one would silently overwrite the other's saved files
            raise RequestError(f"scene {_short(self.scenes[self.scene_index].name)} would be saved as {name}, as scene "
                               f"{_short(twins[0])} is: rename one of the two files in the dataset", 409)
        try:
            folder = self.session.save(self.save_dir, name)
        except (OSError, ValueError) as exc:
            raise RequestError(f"could not save into {self.save_dir}: {exc}", 500) from None
        return {"folder": str(folder), "name": name, "command": self.test_command, **self._history()}

    def instance(self, query: dict) -> dict:
        y, x = self._point(query)
        s = self.session
        try:
            inst_id = s.instance_at(y, x)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        label = int(s.label[y, x])
        return {"id": inst_id, "label": label, "name": self.labels[label]["name"],
                "styles": self.labels[label]["styles"], "style": s.style_of(y, x), "thing": label in THING_CLASSES}

    def styles(self, query: dict) -> dict:
        y, x = self._point(query)
        try:
            start = time.perf_counter()
            previews = self.session.style_previews(y, x)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        return {"previews": [data_url(p) for p in previews], "style": self.session.style_of(y, x),
                "ms": (time.perf_counter() - start) * 1e3}

    @staticmethod
    def _point(query: dict) -> tuple[int, int]:
        try:
            y, x = query["y"][0], query["x"][0]
            if not (re.fullmatch(r"\d{1,9}", y) and re.fullmatch(r"\d{1,9}", x)):
                raise ValueError
            return int(y), int(x)
        except (KeyError, ValueError, IndexError):
            raise RequestError("give the pixel as ?y=<row>&x=<column> (non-negative integers)") from None

    def image(self, name: str) -> bytes:
        s = self.session
        if name == "image":
            return png_bytes(s.image())
        if name == "label_colours":
            return png_bytes(s.label_image())
        if name == "label_ids":
            return png_bytes(s.label.cpu().numpy().astype(np.uint8))
        if name == "instance_ids":
            return png_bytes(s.inst.cpu().numpy().astype(np.uint16))
        if name == "outlines":
            return png_bytes(s.instance_outlines())
        match = re.fullmatch(r"object(\d{1,6})", name)
        if match and int(match.group(1)) < len(self.objects):
            obj = self.objects[int(match.group(1))]
            thumbnail = np.zeros((*obj.mask.shape, 4), np.uint8)
            thumbnail[obj.mask] = (*label_palette(self.model.spec.label_nc)[obj.label], 255)
            return png_bytes(thumbnail)
        raise RequestError(f"no such image {_short(name)}", 404)

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, path: str, body: bytes, wait: float = -1) -> tuple[int, str, bytes]:
        """(status, content type, payload) for a request whose headers the HTTP layer has checked; 503
        if the generator stays busy for more than ``wait`` seconds (negative: wait as long as it takes)."""
        try:
            try:
                url = urlparse(path)
            except ValueError:  # e.g. an unclosed '[' in an absolute URL
                raise RequestError(f"the request target {_short(path)} is not a valid URL") from None
            try:
                query = parse_qs(url.query, max_num_fields=MAX_QUERY_FIELDS)
            except ValueError:
                raise RequestError(f"a request has at most {MAX_QUERY_FIELDS} query fields") from None
            if not self.lock.acquire(timeout=wait):
                raise RequestError("the editor is busy with other requests; try again in a moment", 503)
            try:
                if method == "GET" and url.path in ("/", "/index.html"):
                    page = resources.files(__package__).joinpath("static/editor.html").read_bytes()
                    return 200, "text/html; charset=utf-8", page
                if method == "GET" and url.path == "/api/info":
                    return self._json(self.info())
                if method == "GET" and url.path == "/api/instance":
                    return self._json(self.instance(query))
                if method == "GET" and url.path == "/api/styles":
                    return self._json(self.styles(query))
                if method == "GET" and url.path.startswith("/api/download/") and url.path.endswith(".png"):
                    name = url.path[len("/api/download/"):-len(".png")]
                    if name not in DOWNLOADS:
                        raise RequestError(f"no such download {_short(name)}; there are {', '.join(DOWNLOADS)}", 404)
                    return 200, "image/png", self.image(name)
                if method == "GET" and url.path.startswith("/api/") and url.path.endswith(".png"):
                    return 200, "image/png", self.image(url.path[len("/api/"):-len(".png")])
                if method == "POST" and url.path in ("/api/edit", "/api/scene", "/api/save"):
                    payload = self._body(body)
                    if url.path == "/api/edit":
                        return self._json(self.edit(payload))
                    return self._json(self.load_scene(payload) if url.path == "/api/scene" else self.save())
            finally:
                self.lock.release()
        except RequestError as exc:
            return exc.status, "application/json", json.dumps({"error": str(exc)}).encode()
        except Exception as exc:  # a bug: say so, keep serving, leave the traceback for the terminal
            traceback.print_exc(file=sys.stderr)
            message = f"the editor failed on this request ({type(exc).__name__}: {exc}); see its terminal"
            return 500, "application/json", json.dumps({"error": message}).encode()
        return 404, "application/json", json.dumps({"error": f"no such resource: {method} {url.path}"}).encode()

    @staticmethod
    def _body(body: bytes) -> dict:
        try:
            payload = json.loads(body or b"{}")
        except RecursionError:
            raise RequestError("the request body nests too deeply to be an editor request") from None
        except ValueError as exc:  # bad JSON or UTF-8, or an integer too long to convert
            raise RequestError(f"the request body is not valid JSON ({str(exc)[:80]})") from None
        if not isinstance(payload, dict):
            raise RequestError("the request body must be a JSON object")
        return payload

    def download_name(self, name: str) -> str:
        """The file name a download of ``name`` is offered under: the scene's name, sanitised."""
        return f"{file_name(self.scenes[self.scene_index].name.replace('/', '_'))}_{name}.png"

    @staticmethod
    def _json(data: dict) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(data).encode()


# ---------------------------------------------------------------------------- HTTP
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


def _host_ok(value: str, allowed: frozenset[str] | None, port: int) -> bool:
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
    hosts = allowed_hosts(listen_host, port)

    class Handler(BaseHTTPRequestHandler):
        """Answers one request that ``EditorServer`` has already read whole (``self.request`` is its
        ``Connection``): the parsing and its errors (400, 414, 431, 501, 505) are http.server's."""

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
            if host is None or not _host_ok(host, hosts, port):
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
                wait = self.request.arrived + ANSWER_WITHIN - time.monotonic()
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


@dataclass(eq=False)
class Connection:
    """A client connection while ``EditorServer`` reads its request, a worker answers it, or it lingers."""

    sock: socket.socket
    address: tuple
    deadline: float  # when the server gives up on it: the whole request must have arrived by then
    data: bytearray = field(default_factory=bytearray)
    size: int | None = None  # of the whole request, once its head has arrived
    arrived: float = 0.0  # when the whole request had arrived
    lingering: bool = False

    @property
    def client(self) -> str:
        return self.address[0]


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*(\d{1,12})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def request_size(data: bytes, start: int = 0) -> int | None:
    """How many bytes the request at the start of ``data`` has (head and body), or None while its head
    is incomplete (the end of the head is searched from ``start``: a trickled head is not rescanned).
    A body the handler will refuse (too large, chunked, bad length) is not waited for."""
    end = _HEAD_END.search(data, max(start - 3, 0))
    if end is None:
        return None
    head = bytes(data[:end.end()])
    length = _CONTENT_LENGTH.search(head)
    if length is None or int(length.group(1)) > MAX_BODY or re.search(rb"(?im)^transfer-encoding:", head):
        return end.end()
    return end.end() + int(length.group(1))


def http_error(status: int, message: str) -> bytes:
    """A whole JSON error answer, sent by the server itself (no handler involved) before it closes."""
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.0 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
            b"Cache-Control: no-store\r\n\r\n%s" % (status, HTTPStatus(status).phrase.encode(), len(body), body))


BUSY_RESPONSE = http_error(503, "the editor is busy; try again in a moment")


class EditorServer:
    """The editor's HTTP server: one thread reads every request whole, with a deadline for the whole
    request, and hands complete ones to at most ``MAX_WORKERS`` worker threads.

    A slow or idle client costs a socket and a buffer, never a worker, and is answered 408 at its
    deadline; a client that already holds ``MAX_PER_CLIENT`` connections, or a full server
    (``MAX_CONNECTIONS``, ``MAX_BUFFERED``), gets 503 at once; so does a request that waits more than
    ``ANSWER_WITHIN`` seconds for a worker or the generator. One request per connection; after the answer the server
    reads what the client still sends for up to ``LINGER`` seconds before closing, so the answer is
    not lost to a TCP reset. As a context manager (``with serve(app) as server:``) it stops serving
    and closes its sockets on exit.
    """

    def __init__(self, address: tuple[str, int], handler=None):
        self.socket = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.RequestHandlerClass = handler
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()  # workers and shutdown() wake the loop through it
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        self.open: dict[str, int] = {}  # client address -> connections being read or answered
        self.reading: set[Connection] = set()
        self.lingering: set[Connection] = set()
        self.waiting: deque[Connection] = deque()  # read whole, waiting for a worker
        self.done: queue.SimpleQueue[Connection] = queue.SimpleQueue()  # answered by a worker
        self.answering = 0  # requests handed to workers and not yet given back
        self.buffered = 0  # bytes in the ``data`` of counted connections
        self._stop = threading.Event()
        self._stopped = threading.Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()  # (serve() started serve_forever in a thread)
        self.server_close()

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:  # a bug: report it and keep serving the other clients
                    traceback.print_exc(file=sys.stderr)
        finally:
            self._stopped.set()

    def _step(self) -> None:
        for key, _ in self.selector.select(timeout=0.05):
            if key.fileobj is self.socket:
                self._accept()
            elif key.fileobj is self._wake_r:
                self._drain_wakeups()
            else:
                self._read(key.data)
        while not self.done.empty():
            conn = self.done.get()
            self.answering -= 1
            self._release(conn)
            self._linger(conn)
        self._expire(time.monotonic())
        self._dispatch()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        for conn in [*self.reading, *self.lingering, *self.waiting]:
            conn.sock.close()
        while not self.done.empty():
            self.done.get().sock.close()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()
        self.selector.close()

    # ------------------------------------------------------------------ the loop's steps
    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: the client stays queued until one is free
                return
            sock.setblocking(False)
            conn = Connection(sock, address, time.monotonic() + REQUEST_DEADLINE)
            if sum(self.open.values()) >= MAX_CONNECTIONS or self.open.get(conn.client, 0) >= MAX_PER_CLIENT:
                self._refuse(conn, BUSY_RESPONSE)
                continue
            self.open[conn.client] = self.open.get(conn.client, 0) + 1
            self.reading.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: Connection) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = None  # reset by the client
        if conn.lingering:
            if not chunk:
                self._end_linger(conn)
            return
        if not chunk:
            if chunk is None or not conn.data:
                self._stop_reading(conn)
                conn.sock.close()
            else:  # the client stopped sending: answer what it sent (a cut-off request gets its 400)
                self._ready(conn)
            return
        if self.buffered + len(chunk) > MAX_BUFFERED:
            self._stop_reading(conn)
            self._refuse(conn, BUSY_RESPONSE)
            return
        conn.data += chunk
        self.buffered += len(chunk)
        if conn.size is None:
            conn.size = request_size(conn.data, len(conn.data) - len(chunk))
        if conn.size is None and len(conn.data) > MAX_HEAD:
            status = 414 if b"\n" not in conn.data else 431
            self._stop_reading(conn)
            self._refuse(conn, http_error(status, f"the request line and headers are longer than {MAX_HEAD} bytes"))
        elif conn.size is not None and len(conn.data) >= conn.size:
            self._ready(conn)

    def _ready(self, conn: Connection) -> None:
        self.selector.unregister(conn.sock)
        self.reading.discard(conn)
        conn.arrived = time.monotonic()
        self.waiting.append(conn)

    def _dispatch(self) -> None:
        while self.waiting and self.answering < MAX_WORKERS:
            self.answering += 1
            threading.Thread(target=self._answer, args=(self.waiting.popleft(),), daemon=True).start()

    def _answer(self, conn: Connection) -> None:
        """(a worker thread) Answers ``conn``'s request and gives the connection back to the loop."""
        try:
            conn.sock.setblocking(True)
            self.RequestHandlerClass(conn, conn.address, self)
        except OSError:  # the client went away or did not read its answer in time: nothing to tell it
            pass
        except Exception:  # a bug: keep serving, leave the traceback for the terminal
            traceback.print_exc(file=sys.stderr)
        finally:
            if self._stopped.is_set():  # nobody will take it back
                conn.sock.close()
            self.done.put(conn)
            self._wake()

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.reading if c.deadline <= now]:
            self._stop_reading(conn)
            self._refuse(conn, http_error(408, f"the whole request must arrive within {REQUEST_DEADLINE:g} seconds"))
        while self.waiting and self.waiting[0].arrived + ANSWER_WITHIN <= now:
            conn = self.waiting.popleft()
            self._release(conn)
            self._refuse(conn, BUSY_RESPONSE)
        for conn in [c for c in self.lingering if c.deadline <= now]:
            self._end_linger(conn)

    def _refuse(self, conn: Connection, answer: bytes) -> None:
        """Sends ``answer`` (small: it fits the empty send buffer of a connection that was never answered)."""
        try:
            conn.sock.send(answer)
        except OSError:
            pass
        self._linger(conn)

    def _linger(self, conn: Connection) -> None:
        """Stops sending on ``conn`` and reads (and drops) what the client still sends, until it closes
        or ``LINGER`` seconds pass: closing with unread data would reset the connection and could
        destroy the answer before the client reads it."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            conn.sock.close()
            return
        if len(self.lingering) >= MAX_LINGERING:  # (refused floods must not exhaust file descriptors)
            conn.sock.close()
            return
        conn.sock.setblocking(False)
        conn.lingering, conn.deadline = True, time.monotonic() + LINGER
        self.lingering.add(conn)
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _end_linger(self, conn: Connection) -> None:
        self.lingering.discard(conn)
        self.selector.unregister(conn.sock)
        conn.sock.close()

    def _stop_reading(self, conn: Connection) -> None:
        self._release(conn)
        self.reading.discard(conn)
        self.selector.unregister(conn.sock)

    def _release(self, conn: Connection) -> None:
        """``conn`` no longer counts against its client's connections, nor its request against MAX_BUFFERED."""
        self.buffered -= len(conn.data)
        conn.data = bytearray()
        left = self.open[conn.client] - 1
        if left:
            self.open[conn.client] = left
        else:
            del self.open[conn.client]

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # its buffer is full (the loop will wake anyway) or the server is closed
            pass

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass


def serve(app: EditorApp, host: str = "127.0.0.1", port: int = 8765) -> EditorServer:
    """A started server (in a daemon thread); ``server.server_address`` has the port, ``shutdown()`` stops it."""
    server = EditorServer((host, port))
    server.RequestHandlerClass = make_handler(app, host, server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def load_editor(model, data: DataSpec, *, max_scenes: int = 32, max_objects: int = 12, seed: int = 0,
                trained_classes: Iterable[int] | None = None, save_dir: str | Path | None = None,
                test_command: str | None = None) -> EditorApp:
    """An EditorApp for ``model`` (a trained Pix2PixHD with its clusters, e.g. from ``load_run``): the
    scenes of ``data`` (unflipped), and object masks (the largest thing instances of those scenes) for
    the add-object tool."""
    from ..data import create_dataset
    from ..inference import with_step_memory

    dataset = create_dataset(with_step_memory(model, data.replace(train=False, read_images=False)))
    scenes, objects = [], []
    for i in range(min(len(dataset), max_scenes)):
        item = dataset[i]
        label, inst = item["label"][0].numpy(), item["inst"][0].numpy()
        name = item["name"]
        scenes.append(Scene(name, label, inst))
        for value in np.unique(inst):
            cls = class_of_instance(int(value))
            if cls in THING_CLASSES and len(objects) < max_objects:
                ys, xs = np.nonzero(inst == value)
                if len(ys) >= 16:
                    mask = inst[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == value
                    objects.append(ObjectMask(f"{CITYSCAPES_CLASSES[cls][0] if cls < len(CITYSCAPES_CLASSES) else cls} "
                                              f"from {name}", cls, mask))
    return EditorApp(model, scenes, objects, seed=seed, trained_classes=trained_classes, save_dir=save_dir,
                     test_command=test_command)


def main_edit(model, data: DataSpec, *, name: str, run_folder: Path, host: str, port: int, max_scenes: int,
              seed: int) -> int:
    """``fastp2phd edit``: serve the editor until Ctrl+C; "save" writes into ``run_folder/edits``."""
    from ..train_state import trained_classes

    save_dir = run_folder / "edits"
    command = (f"{Path(sys.executable).name} -m fastp2phd test --name {name} --checkpoints_dir {run_folder.parent} "
               f"--dataroot {save_dir} --resize_or_crop none")
    try:
        app = load_editor(model, data, max_scenes=max_scenes, seed=seed, trained_classes=trained_classes(run_folder),
                          save_dir=save_dir, test_command=command)
    except (Pix2PixHDError, ValueError) as exc:
        print(f"fastp2phd edit: {exc}", file=sys.stderr)
        return 1
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the editor listens on {host}: anyone who can reach this machine can use it", file=sys.stderr)
    try:
        server = serve(app, host, port)
    except OSError as exc:
        print(f"fastp2phd edit: cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port",
              file=sys.stderr)
        return 1
    bound_host, bound_port = server.server_address[:2]
    device = next(model.parameters()).device
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"editing {len(app.scenes)} scenes of {name} on {device} in {model.precision}: open http://{shown}:{bound_port}/ "
          f"(Ctrl+C to stop); saved scenes go to {save_dir}")
    with server:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0
