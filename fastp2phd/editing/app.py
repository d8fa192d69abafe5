"""The editor's state and requests, apart from the HTTP plumbing (``server.py``): one ``EditSession`` per
scene, the JSON API's validation (every bad request answers 400 with a sentence saying why and leaves the
scene unchanged), saving scenes as a dataset, and ``load_editor`` that gathers a run's scenes and objects."""
from __future__ import annotations

import base64
import io
import json
import re
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from PIL import Image

from ..data import CITYSCAPES_CLASSES, THING_CLASSES, class_of_instance, label_palette
from ..errors import InvalidArgumentError
from ..features import sample_feature_map
from ..files import remove_leftover_temporaries
from ..specs import DataSpec
from .session import MAX_STROKE_POINTS, EditSession

MAX_QUERY_FIELDS = 8  # the API's queries have two
DOWNLOADS = ("image", "label_ids", "instance_ids", "label_colours")  # what /api/download/<name>.png offers


@dataclass
class Scene:
    name: str
    label: np.ndarray  # (H, W) class ids
    inst: np.ndarray  # (H, W) instance ids
    vectors: dict | None = None  # {instance id: feature vector} of a saved scene: it reopens with them


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
    ``fastp2phd test`` reads (``test_command`` is shown to say how). Every scene opens with the features
    ``fastp2phd test --seed seed`` samples for it when it runs on ``scenes``, in their order.
    """

    def __init__(self, model, scenes: list[Scene], objects: list[ObjectMask], seed: int = 0, *,
                 trained_classes: Iterable[int] | None = None, save_dir: str | Path | None = None,
                 test_command: str | None = None):
        if not scenes:
            raise InvalidArgumentError("the editor needs at least one scene")
        self.model = model
        self.scenes = scenes
        self.objects = objects
        device = next(model.parameters()).device
        self._test_states = [torch.Generator(device=device).manual_seed(seed).get_state()]  # see _generator
        self.save_dir = None if save_dir is None else Path(save_dir)
        if self.save_dir is not None and self.save_dir.is_dir():  # a save killed midway: finish it, or drop its pieces
            remove_leftover_temporaries(self.save_dir, recursive=True)
        self.test_command = test_command
        # Requests use the model one at a time, on one long-lived thread: torch's OpenMP threads belong to the thread
        # that calls in, and a new request thread would start new ones (5-7 ms of a 15 ms edit on 2 cores).
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="fastp2phd-editor-model")
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
        self.view = 0  # numbers the state of what the page shows; every change or scene load moves it on

    def _open(self, index: int) -> EditSession:
        if index not in self.sessions:
            scene = self.scenes[index]
            self.sessions[index] = EditSession(self.model, scene.label, scene.inst, vectors=scene.vectors,
                                               generator=self._generator(index))
        return self.sessions[index]

    def _generator(self, index: int) -> torch.Generator:
        """A generator seeded with ``seed`` that has drawn what `fastp2phd test` draws for the scenes before ``index``:
        test samples every scene's features from one generator in turn, so the scene opens with the features test
        gives it. The state before each scene is kept: each scene's draws are worked out once."""
        generator = torch.Generator(device=next(self.model.parameters()).device)
        start = min(index, len(self._test_states) - 1)
        generator.set_state(self._test_states[start])
        for scene in self.scenes[start:index]:
            self._draw_as_test(scene, generator)
            self._test_states.append(generator.get_state())
        return generator

    def _draw_as_test(self, scene: Scene, generator: torch.Generator) -> None:
        """Draw from ``generator`` what `fastp2phd test` draws for ``scene`` (nothing when its saved vectors name every
        instance), by sampling its regions' ids alone: the draws depend on nothing else."""
        spec = self.model.spec
        if not spec.uses_features or self.model.clusters is None:
            return
        named = np.unique(scene.label if spec.no_instance else scene.inst)  # what test looks saved vectors up by
        if set(named.tolist()) - set(scene.vectors or {}):
            regions = torch.as_tensor(np.unique(scene.label if spec.label_feat else scene.inst))
            sample_feature_map(regions.view(1, 1, 1, -1).to(generator.device), self.model.clusters, spec.feat_num,
                               generator=generator)

    # ------------------------------------------------------------------ API
    def info(self) -> dict:
        return {
            "scenes": [s.name for s in self.scenes], "scene": self.scene_index,
            "size": [self.session.height, self.session.width], "labels": self.labels,
            "trained_source": self.trained_source, "features": self.session.use_features,
            "can_save": self.save_dir is not None, "view": self.view,
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
        self.session.regenerate()
        self.view += 1  # the page fetches every view of this scene anew
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
        changed = s.changed_box
        rewritten = s.regenerate()  # now, so the time covers edit -> new image
        return {"ms": (time.perf_counter() - start) * 1e3, "view": self._view_update(changed, rewritten),
                **self._history()}

    def _view_update(self, changed, rewritten) -> dict:
        """What the page shows that an edit changed, as PNG patches it draws over the views of version ``from``:
        the generated image in ``rewritten``, the label colours and instance outlines in ``changed``. A page
        holding another version (another tab edited, or switched scenes) fetches the views whole instead. An edit
        that changed nothing (undo with nothing to undo, a style the instance has) leaves the version as it was."""
        if changed is None:
            return {"from": self.view, "to": self.view, "patches": []}
        patches = [{"view": name, "box": box, "url": data_url(picture(box))} for name, box, picture in (
            ("image", rewritten, self.session.image), ("label_colours", changed, self.session.label_image),
            ("outlines", changed, self.session.instance_outlines))]
        self.view += 1
        return {"from": self.view - 1, "to": self.view, "patches": patches}

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
            job = self.model_thread.submit(self._route, method, url, query, body)
            try:
                return job.result(timeout=None if wait < 0 else wait)
            except TimeoutError:
                if job.cancel():  # (a started job is answered, however long it takes)
                    raise RequestError("the editor is busy with other requests; try again in a moment", 503) from None
                return job.result()
        except RequestError as exc:
            return exc.status, "application/json", json.dumps({"error": str(exc)}).encode()
        except Exception as exc:  # a bug: say so, keep serving, leave the traceback for the terminal
            traceback.print_exc(file=sys.stderr)
            message = f"the editor failed on this request ({type(exc).__name__}: {exc}); see its terminal"
            return 500, "application/json", json.dumps({"error": message}).encode()

    def _route(self, method: str, url, query: dict, body: bytes) -> tuple[int, str, bytes]:
        """(on the model thread) The answer to a parsed request."""
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


def load_editor(model, data: DataSpec, *, max_scenes: int = 32, max_objects: int = 12, seed: int = 0,
                trained_classes: Iterable[int] | None = None, save_dir: str | Path | None = None,
                test_command: str | None = None) -> EditorApp:
    """An EditorApp for ``model`` (a trained Pix2PixHD with its clusters, e.g. from ``load_run``): the
    scenes of ``data`` (unflipped), and object masks (the largest thing instances of those scenes) for
    the add-object tool. A scene saved by the editor (``<phase>_features/<name>.npz`` beside its label
    map) reopens with the feature vectors it was saved with, as ``fastp2phd test`` regenerates it."""
    from ..data import create_dataset
    from ..features import load_instance_vectors
    from ..inference import with_step_memory

    dataset = create_dataset(with_step_memory(model, data.replace(train=False, read_images=False)))
    saved = Path(data.dataroot) / f"{data.phase}_features"
    scenes, objects = [], []
    for i in range(min(len(dataset), max_scenes)):
        item = dataset[i]
        label, inst = item["label"][0].numpy(), item["inst"][0].numpy()
        name = item["name"]
        vectors = None
        if model.spec.uses_features and not model.spec.load_features and (saved / f"{name}.npz").is_file():
            vectors = load_instance_vectors(saved / f"{name}.npz", model.spec.feat_num)
        scenes.append(Scene(name, label, inst, vectors))
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
