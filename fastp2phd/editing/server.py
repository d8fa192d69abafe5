"""The web editor: a single page served on 127.0.0.1 over an EditSession.

``fastp2phd edit --name NAME`` loads the run's generator (and clusters), the test
scenes of its dataset and a few object masks, and serves the page and a small JSON
API with Python's standard HTTP server. One session is edited at a time; a lock
lets one request use the generator at a time, so concurrent clicks queue instead
of interleaving. Every request is validated: bad JSON, unknown operations,
coordinates or labels out of range answer 400 with a sentence saying why, and the
scene is left unchanged.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image

from ..data import CITYSCAPES_CLASSES, THING_CLASSES, class_of_instance, label_palette
from ..errors import Pix2PixHDError
from ..specs import DataSpec
from .session import EditSession

MAX_BODY = 1 << 20  # bytes: a stroke of a few thousand points fits easily


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
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(array: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode()


class RequestError(ValueError):
    """A request the editor refuses; its message is sent back with status 400."""


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    return value


class EditorApp:
    """The editor's state and request handling, independent of the HTTP plumbing (so tests can call it)."""

    def __init__(self, model, scenes: list[Scene], objects: list[ObjectMask], seed: int = 0):
        if not scenes:
            raise ValueError("the editor needs at least one scene")
        self.model = model
        self.scenes = scenes
        self.objects = objects
        self.seed = seed
        self.lock = threading.Lock()
        label_nc = model.spec.label_nc
        names = [name for name, _ in CITYSCAPES_CLASSES] if label_nc == len(CITYSCAPES_CLASSES) else [
            f"class {i}" for i in range(label_nc)]
        self.labels = [{"id": i, "name": names[i], "color": "#%02x%02x%02x" % tuple(int(c) for c in color),
                        "thing": i in THING_CLASSES} for i, color in enumerate(label_palette(label_nc))]
        self.scene_index = 0
        self.session = self._open(0)

    def _open(self, index: int) -> EditSession:
        scene = self.scenes[index]
        return EditSession(self.model, scene.label, scene.inst, seed=self.seed)

    # ------------------------------------------------------------------ API
    def info(self) -> dict:
        return {
            "scenes": [s.name for s in self.scenes], "scene": self.scene_index,
            "size": [self.session.height, self.session.width], "labels": self.labels,
            "features": self.session.use_features,
            "objects": [{"index": i, "name": o.name, "label": o.label, "height": int(o.mask.shape[0]),
                         "width": int(o.mask.shape[1])} for i, o in enumerate(self.objects)],
            **self._history(),
        }

    def _history(self) -> dict:
        return {"undo": len(self.session.undo_stack), "redo": len(self.session.redo_stack)}

    def load_scene(self, body: dict) -> dict:
        index = _int(body.get("index"), "index")
        if not 0 <= index < len(self.scenes):
            raise RequestError(f"scene {index} does not exist; there are {len(self.scenes)}")
        start = time.perf_counter()
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
                s.paint([(_int(y, "y"), _int(x, "x")) for y, x in points], _int(body.get("label"), "label"),
                        _int(body.get("width", 8), "width"))
            elif op == "add_object":
                index = _int(body.get("object"), "object")
                if not 0 <= index < len(self.objects):
                    raise RequestError(f"object {index} does not exist; there are {len(self.objects)}")
                obj = self.objects[index]
                style = body.get("style")
                s.add_object(obj.mask, _int(body.get("y"), "y"), _int(body.get("x"), "x"),
                             _int(body.get("label", obj.label), "label"), None if style is None else _int(style, "style"))
            elif op == "set_style":
                s.set_style(_int(body.get("y"), "y"), _int(body.get("x"), "x"), _int(body.get("style"), "style"))
            elif op == "undo":
                s.undo()
            elif op == "redo":
                s.redo()
            elif op == "reset":
                s.reset()
            else:
                raise RequestError(f"unknown operation {op!r}; use change_label, paint, add_object, set_style, "
                                   "undo, redo or reset")
        except ValueError as exc:  # the session refused the edit and changed nothing
            raise RequestError(str(exc)) from None
        s.image()  # regenerate now, so the time covers edit -> new image
        return {"ms": (time.perf_counter() - start) * 1e3, **self._history()}

    def instance(self, query: dict) -> dict:
        y, x = self._point(query)
        s = self.session
        try:
            inst_id = s.instance_at(y, x)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        label = int(s.label[y, x])
        styles = 0
        if s.use_features:
            try:
                styles = int(s.style_options(y, x).shape[0])
            except ValueError:
                styles = 0
        return {"id": inst_id, "label": label, "name": self.labels[label]["name"], "styles": styles}

    def styles(self, query: dict) -> dict:
        y, x = self._point(query)
        try:
            start = time.perf_counter()
            previews = self.session.style_previews(y, x)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        return {"previews": [data_url(p) for p in previews], "ms": (time.perf_counter() - start) * 1e3}

    @staticmethod
    def _point(query: dict) -> tuple[int, int]:
        try:
            return int(query["y"][0]), int(query["x"][0])
        except (KeyError, ValueError, IndexError):
            raise RequestError("give the pixel as ?y=<row>&x=<column> (integers)") from None

    def image(self, name: str) -> bytes:
        s = self.session
        if name == "image":
            return png_bytes(s.image())
        if name == "label":
            return png_bytes(s.label_image())
        if name == "instance":
            return png_bytes(s.inst.cpu().numpy().astype(np.uint16))
        if name.startswith("object"):
            try:
                mask = self.objects[int(name[len("object"):])].mask
            except (ValueError, IndexError):
                raise RequestError(f"no such object image {name!r}") from None
            return png_bytes((mask * 255).astype(np.uint8))
        raise RequestError(f"no such image {name!r}")

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        """(status, content type, payload) for a request."""
        url = urlparse(path)
        query = parse_qs(url.query)
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
                if method == "GET" and url.path.startswith("/api/") and url.path.endswith(".png"):
                    name = url.path[len("/api/"):-len(".png")].removeprefix("download/")
                    return 200, "image/png", self.image(name)
                if method == "POST" and url.path in ("/api/edit", "/api/scene"):
                    try:
                        payload = json.loads(body or b"{}")
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise RequestError("the request body is not valid JSON") from None
                    if not isinstance(payload, dict):
                        raise RequestError("the request body must be a JSON object")
                    return self._json(self.edit(payload) if url.path == "/api/edit" else self.load_scene(payload))
        except RequestError as exc:
            return 400, "application/json", json.dumps({"error": str(exc)}).encode()
        return 404, "application/json", json.dumps({"error": f"no such resource: {method} {url.path}"}).encode()

    @staticmethod
    def _json(data: dict) -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(data).encode()


def make_handler(app: EditorApp):
    class Handler(BaseHTTPRequestHandler):
        server_version = "fastp2phd-editor"

        def _respond(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:  # answered without reading the body; the connection then closes
                status, kind, payload = 413, "application/json", json.dumps(
                    {"error": f"request body over {MAX_BODY} bytes"}).encode()
                self.close_connection = True
            else:
                body = self.rfile.read(length) if length else b""
                status, kind, payload = app.handle(method, self.path, body)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            if "/download/" in self.path:
                name = self.path.rsplit("/", 1)[-1]
                self.send_header("Content-Disposition", f'attachment; filename="{name}"')
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._respond("GET")

        def do_POST(self):  # noqa: N802
            self._respond("POST")

        def log_message(self, format, *args):  # quiet: the editor prints its own line per edit
            pass

    return Handler


def serve(app: EditorApp, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); ``server.server_address`` has the port, ``shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), make_handler(app))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def load_editor(model, data: DataSpec, *, max_scenes: int = 32, max_objects: int = 12, seed: int = 0) -> EditorApp:
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
    return EditorApp(model, scenes, objects, seed=seed)


def main_edit(model, data: DataSpec, *, name: str, host: str, port: int, max_scenes: int, seed: int) -> int:
    """``fastp2phd edit``: serve the editor until Ctrl+C."""
    import sys

    try:
        app = load_editor(model, data, max_scenes=max_scenes, seed=seed)
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
    print(f"editing {len(app.scenes)} scenes of {name} on {device}: open http://{bound_host}:{bound_port}/ "
          "(Ctrl+C to stop)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0
