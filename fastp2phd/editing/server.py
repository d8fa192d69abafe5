"""The web editor: a single page served on 127.0.0.1 over one EditSession per scene.

``fastp2phd edit --name NAME`` loads the run's generator (and clusters), the test
scenes of its dataset and a few object masks, and serves the page and a small JSON
API with Python's standard HTTP server. A lock lets one request use the generator at
a time, so concurrent clicks queue instead of interleaving.

Two layers keep it safe on a machine whose browser visits other sites:

* the HTTP handler (``make_handler``) answers only requests whose ``Host`` is the
  address the editor listens on (DNS rebinding gets 403), refuses state-changing
  requests from another ``Origin`` (403), takes JSON bodies only as
  ``application/json`` (415: so no plain form of another page can post one) with a
  valid ``Content-Length`` (400, or 413 over ``MAX_BODY``), times out slow sockets,
  and serves at most ``MAX_CONNECTIONS`` connections at once (503 beyond);
* ``EditorApp.handle`` validates every request: bad JSON, unknown operations,
  coordinates, labels or strokes out of range answer 400 with a sentence saying why,
  and the scene is left unchanged.
"""
from __future__ import annotations

import base64
import io
import ipaddress
import json
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image

from ..data import CITYSCAPES_CLASSES, THING_CLASSES, class_of_instance, label_palette
from ..errors import Pix2PixHDError
from ..specs import DataSpec
from .session import MAX_STROKE_POINTS, EditSession

MAX_BODY = 1 << 20  # bytes: a stroke of MAX_STROKE_POINTS points fits easily
MAX_CONNECTIONS = 16  # served at once; more wait for none of them: they get 503
SOCKET_TIMEOUT = 20.0  # seconds a client may take to send its request
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
            raise ValueError("the editor needs at least one scene")
        self.model = model
        self.scenes = scenes
        self.objects = objects
        self.seed = seed
        self.save_dir = None if save_dir is None else Path(save_dir)
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
        name = file_name(self.scenes[self.scene_index].name)
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
    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        """(status, content type, payload) for a request whose headers the HTTP layer has checked."""
        url = urlparse(path)
        query = parse_qs(url.query, max_num_fields=8)
        try:
            with self.lock:
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
        return f"{file_name(self.scenes[self.scene_index].name)}_{name}.png"

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
        server_version = "fastp2phd-editor"
        timeout = SOCKET_TIMEOUT  # socket timeout for every read: a slow client is dropped

        def _check(self, method: str) -> bytes:
            """The body of a request that passes the HTTP layer's checks; raises RequestError otherwise."""
            host = self.headers.get("Host")
            if host is None or not _host_ok(host, hosts, port):
                raise RequestError(f"this editor answers requests to {listen_host}:{port} only, not to host "
                                   f"{_short(host)}", 403)
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                raise RequestError("chunked request bodies are not accepted; send a Content-Length")
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
                self.close_connection = True  # an unread body may follow
                status, kind, payload = refused.status, "application/json", json.dumps({"error": str(refused)}).encode()
            except (TimeoutError, ConnectionError):
                self.close_connection = True
                return
            else:
                status, kind, payload = app.handle(method, self.path, body)
            try:
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
            except (ConnectionError, TimeoutError):  # the page cancelled the request (a newer image replaced it)
                self.close_connection = True

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._respond("GET")

        def do_POST(self):  # noqa: N802
            self._respond("POST")

        def log_message(self, format, *args):  # quiet: the page shows what happened
            pass

    return Handler


_BUSY = json.dumps({"error": "the editor is busy; try again in a moment"}).encode()
BUSY_RESPONSE = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY))


class EditorServer(ThreadingHTTPServer):
    """A threaded HTTP server that serves at most ``MAX_CONNECTIONS`` connections at once. As a context
    manager (``with serve(app) as server:``) it stops serving and closes its socket on exit."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address, handler):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def __exit__(self, *exc):
        self.shutdown()  # (serve() started serve_forever in a thread)
        self.server_close()

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that went away is normal
            super().handle_error(request, client_address)


def serve(app: EditorApp, host: str = "127.0.0.1", port: int = 8765) -> EditorServer:
    """A started server (in a daemon thread); ``server.server_address`` has the port, ``shutdown()`` stops it."""
    server = EditorServer((host, port), None)
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

    dataset = create_dataset(data.replace(train=False, read_images=False))
    scenes, objects = [], []
    for i in range(min(len(dataset), max_scenes)):
        item = dataset[i]
        label, inst = item["label"][0].numpy(), item["inst"][0].numpy()
        name = item["path"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
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
    print(f"editing {len(app.scenes)} scenes of {name} on {device}: open http://{shown}:{bound_port}/ "
          f"(Ctrl+C to stop); saved scenes go to {save_dir}")
    with server:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0
