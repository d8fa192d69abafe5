"""EditSession: every edit changes exactly its pixels, the generator input stays consistent,
undo/redo are exact, bad requests change nothing; and the editor's HTTP API."""
from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from fastp2phd import ops
from support import tiny_model

from fastp2phd.data import render_scene
from fastp2phd.editing import EditSession
from fastp2phd.editing.server import EditorApp, ObjectMask, Scene, serve
from fastp2phd.options import finish_options

H, W = 32, 64


@pytest.fixture
def session() -> EditSession:
    label, inst, _ = render_scene(H, W, seed=4)
    return EditSession(tiny_model(), label, inst, seed=0)


def rebuilt_input(s: EditSession) -> torch.Tensor:
    """The generator input computed from scratch from the session's current maps."""
    full = s.model.encode_input(s.label[None, None], s.inst[None, None])
    return torch.cat([full, s.feat[None]], 1) if s.feat is not None else full


def assert_consistent(s: EditSession) -> None:
    assert torch.equal(s.input, rebuilt_input(s))
    assert torch.equal(s.input[0, 35], ops.boundary_map(s.inst[None, None])[0, 0])


def snapshot(s: EditSession):
    return [t.clone() if t is not None else None for t in (s.label, s.inst, s.feat, s.input)] + [s.image().copy()]


def same(a, b) -> bool:
    return all((x is None and y is None) or (np.array_equal(x, y) if isinstance(x, np.ndarray) else torch.equal(x, y))
               for x, y in zip(a, b))


def a_car(s: EditSession) -> tuple[int, int, int]:
    ids = [int(v) for v in torch.unique(s.inst) if 26000 <= int(v) < 27000]
    car = max(ids, key=lambda v: int((s.inst == v).sum()))
    ys, xs = torch.nonzero(s.inst == car, as_tuple=True)
    return car, int(ys[len(ys) // 2]), int(xs[len(xs) // 2])


def test_initial_state_is_consistent(session):
    assert_consistent(session)
    image = session.image()
    assert image.shape == (H, W, 3) and image.dtype == np.uint8


def test_change_label_changes_exactly_the_instance(session):
    car, y, x = a_car(session)
    before_label, before_inst, before_feat = session.state()
    session.change_label(y, x, 24)
    label, inst, feat = session.state()
    region = before_inst == car
    assert (label[region] == 24).all() and (label[~region] == before_label[~region]).all()
    new_id = int(inst[y, x])
    assert 24000 <= new_id < 25000 and new_id not in set(np.unique(before_inst).tolist())
    assert (inst[region] == new_id).all() and (inst[~region] == before_inst[~region]).all()
    assert np.array_equal(feat[:, ~region], before_feat[:, ~region])
    assert_consistent(session)


def test_paint_changes_the_stroke_pixels(session):
    before_label, before_inst, _ = session.state()
    points = [(5, 5), (5, 40), (20, 40)]
    session.paint(points, 21, width=5)
    label, inst, _ = session.state()
    changed = label != before_label
    yy, xx = np.mgrid[:H, :W]
    near = np.zeros((H, W), bool)
    for (ay, ax), (by, bx) in zip(points, points[1:]):
        d = np.array([by - ay, bx - ax], float)
        t = np.clip(((yy - ay) * d[0] + (xx - ax) * d[1]) / (d @ d), 0, 1)
        near |= (yy - (ay + t * d[0])) ** 2 + (xx - (ax + t * d[1])) ** 2 <= 2.5**2
    assert (label[near] == 21).all() and (inst[near] == 21).all()  # stuff: the class id is the instance id
    assert not (changed & ~near).any()
    assert_consistent(session)


def test_add_object_places_a_new_instance_with_a_style(session):
    mask = np.zeros((6, 10), bool)
    mask[1:5, 2:9] = True
    before_label, before_inst, _ = session.state()
    new_id = session.add_object(mask, H - 4, W - 6, 26, style=2)  # partly outside: clipped
    label, inst, feat = session.state()
    placed = np.zeros((H, W), bool)
    placed[H - 4:, W - 6:] = mask[:4, :6]
    assert 26000 <= new_id < 27000 and (inst[placed] == new_id).all() and (label[placed] == 26).all()
    assert np.array_equal(inst[~placed], before_inst[~placed])
    assert np.allclose(feat[:, placed], session.model.clusters[26][2].numpy()[:, None])
    assert_consistent(session)


def test_style_changes_features_and_mostly_the_instance_neighbourhood(session):
    car, y, x = a_car(session)
    assert session.style_options(y, x).shape == (3, 3)
    first = session.image().astype(float)
    current = session.feat[:, y, x].clone()
    style = next(k for k in range(3) if not torch.equal(session.model.clusters[26][k], current))
    session.set_style(y, x, style)
    region = (session.inst == car).numpy()
    assert np.allclose(session.state()[2][:, region], session.model.clusters[26][style].numpy()[:, None])
    change = np.abs(session.image().astype(float) - first).sum(axis=2)
    ys, xs = np.nonzero(region)
    near = np.zeros((H, W), bool)
    near[max(0, ys.min() - 8):ys.max() + 9, max(0, xs.min() - 8):xs.max() + 9] = True
    assert change.sum() > 0 and change[near].sum() > 0.5 * change.sum()
    assert_consistent(session)


def test_style_previews_render_every_style_in_one_batch(session):
    car, y, x = a_car(session)
    calls = []
    handle = session.model.netG.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    previews = session.style_previews(y, x)
    handle.remove()
    assert calls == [3] and len(previews) == 3
    assert previews[0].shape == previews[1].shape and previews[0].ndim == 3
    assert not np.array_equal(previews[0], previews[1])


def test_undo_redo_are_exact_and_reset_restores(session):
    start = snapshot(session)
    car, y, x = a_car(session)
    session.change_label(y, x, 24)
    session.paint([(2, 2), (10, 30)], 8, width=3)
    session.add_object(np.ones((4, 4), bool), 20, 20, 26)
    after = snapshot(session)
    for _ in range(3):
        assert session.undo()
    assert not session.undo()
    assert same(snapshot(session), start)
    for _ in range(3):
        assert session.redo()
    assert not session.redo()
    assert same(snapshot(session), after)
    session.undo()
    session.paint([(1, 1)], 23, width=2)  # a new edit drops the redo history
    assert not session.redo()
    session.reset()
    assert same(snapshot(session), start) and not session.undo()


@pytest.mark.parametrize("edit", [
    lambda s: s.change_label(H, 0, 7), lambda s: s.change_label(0, -1, 7), lambda s: s.change_label(0, 0, 35),
    lambda s: s.paint([(0, 0), (0, W)], 7), lambda s: s.paint([], 7), lambda s: s.paint([(0, 0)], 7, width=0),
    lambda s: s.add_object(np.zeros((3, 3), bool), 0, 0, 26), lambda s: s.add_object(np.ones(3), 0, 0, 26),
    lambda s: s.add_object(np.ones((3, 3), bool), 0, 0, 26, style=3), lambda s: s.set_style(0, 0, 99),
    lambda s: s.change_label(0.5, 0, 7),
])
def test_bad_edits_raise_and_change_nothing(session, edit):
    before = snapshot(session)
    with pytest.raises(ValueError):
        edit(session)
    assert same(snapshot(session), before) and not session.undo_stack


def test_session_without_features():
    label, inst, _ = render_scene(H, W, seed=5)
    s = EditSession(tiny_model(features=False), label, inst)
    s.change_label(0, 0, 21)
    assert_consistent(s)
    with pytest.raises(ValueError, match="no instance features"):
        s.style_options(0, 0)


def test_save_writes_maps_and_image(session, tmp_path):
    from PIL import Image

    session.paint([(3, 3), (3, 20)], 21, width=3)
    folder = session.save(tmp_path / "edited")
    label, inst, feat = session.state()
    assert np.array_equal(np.array(Image.open(folder / "label.png")), label)
    assert np.array_equal(np.array(Image.open(folder / "instance.png")).astype(np.int64), inst)
    assert np.array_equal(np.load(folder / "features.npy"), feat)
    assert np.array_equal(np.array(Image.open(folder / "image.png")), session.image())


# ----------------------------------------------------------------------------- the HTTP API


@pytest.fixture
def app() -> EditorApp:
    scenes = [Scene(f"scene{i}", *render_scene(H, W, seed=i)[:2]) for i in range(2)]
    objects = [ObjectMask("box", 26, np.ones((4, 6), bool))]
    return EditorApp(tiny_model(), scenes, objects)


def call(app, method, path, body=None):
    status, kind, payload = app.handle(method, path, json.dumps(body).encode() if body is not None else b"")
    return status, (json.loads(payload) if kind == "application/json" else payload)


def test_api_valid_requests(app):
    status, info = call(app, "GET", "/api/info")
    assert status == 200 and info["size"] == [H, W] and len(info["labels"]) == 35 and info["features"]
    assert info["labels"][26] == {"id": 26, "name": "car", "color": "#00008e", "thing": True}
    status, page = call(app, "GET", "/")
    assert status == 200 and b"label-canvas" in page
    status, png = call(app, "GET", "/api/image.png")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, result = call(app, "POST", "/api/edit", {"op": "paint", "points": [[1, 1], [1, 9]], "label": 21, "width": 3})
    assert status == 200 and result["undo"] == 1 and result["ms"] > 0
    car = next(int(v) for v in np.unique(app.session.inst.numpy()) if 26000 <= v < 27000)
    y, x = (int(v[0]) for v in np.nonzero(app.session.inst.numpy() == car))
    status, inst = call(app, "GET", f"/api/instance?y={y}&x={x}")
    assert status == 200 and inst["name"] == "car" and inst["styles"] == 3
    status, styles = call(app, "GET", f"/api/styles?y={y}&x={x}")
    assert status == 200 and len(styles["previews"]) == 3 and styles["previews"][0].startswith("data:image/png;base64,")
    for body in ({"op": "set_style", "y": y, "x": x, "style": 1}, {"op": "add_object", "object": 0, "y": 2, "x": 2},
                 {"op": "change_label", "y": y, "x": x, "label": 24}, {"op": "undo"}, {"op": "redo"}, {"op": "reset"}):
        assert call(app, "POST", "/api/edit", body)[0] == 200, body
    status, scene = call(app, "POST", "/api/scene", {"index": 1})
    assert status == 200 and scene["scene"] == 1


@pytest.mark.parametrize("method, path, body, message", [
    ("POST", "/api/edit", {"op": "explode"}, "unknown operation"),
    ("POST", "/api/edit", {"op": "change_label", "y": 999, "x": 0, "label": 7}, "outside"),
    ("POST", "/api/edit", {"op": "change_label", "y": "1", "x": 0, "label": 7}, "must be an integer"),
    ("POST", "/api/edit", {"op": "change_label", "y": 1, "x": 0, "label": 99}, "not a class id"),
    ("POST", "/api/edit", {"op": "paint", "points": "nope", "label": 7}, "points must be"),
    ("POST", "/api/edit", {"op": "add_object", "object": 5, "y": 0, "x": 0}, "does not exist"),
    ("POST", "/api/scene", {"index": 9}, "does not exist"),
    ("GET", "/api/styles?y=a", None, "give the pixel"),
    ("GET", "/api/nothing.png", None, "no such image"),
])
def test_api_invalid_requests_change_nothing(app, method, path, body, message):
    before = snapshot(app.session)
    status, result = call(app, method, path, body)
    assert status == 400 and message in result["error"]
    assert same(snapshot(app.session), before)


def test_api_over_http(app):
    server = serve(app, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(base + "/api/info") as response:
            assert json.loads(response.read())["scenes"] == ["scene0", "scene1"]
        request = urllib.request.Request(base + "/api/edit", data=b"{not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request)
        assert error.value.code == 400 and "not valid JSON" in json.loads(error.value.read())["error"]
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(base + "/nowhere")
        assert error.value.code == 404
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        connection.putrequest("POST", "/api/edit")
        connection.putheader("Content-Length", str(2 << 20))  # announced, never sent
        connection.endheaders()
        assert connection.getresponse().status == 413
        connection.close()
        with urllib.request.urlopen(base + "/api/download/label.png") as response:
            assert "attachment" in response.headers["Content-Disposition"]
    finally:
        server.shutdown()


def test_edit_command_loads_a_trained_run(tmp_path):
    """`fastp2phd edit` builds its editor from a run's checkpoint and opt.txt (model options not repeated)."""
    from fastp2phd.cli import main, parse
    from fastp2phd.data import make_synthetic
    from fastp2phd.editing.server import load_editor
    from fastp2phd.inference import load_run
    from fastp2phd.options import data_spec

    data = make_synthetic(tmp_path / "data", num_train=4, num_test=2, height=H, width=W, seed=1)
    train = ["train", "--name", "e", "--checkpoints_dir", str(tmp_path), "--dataroot", str(data), "--fineSize", "64",
             "--loadSize", "64", "--resize_or_crop", "none", "--ngf", "4", "--n_downsample_global", "2",
             "--n_blocks_global", "1", "--ndf", "4", "--n_layers_D", "2", "--no_vgg_loss", "--niter", "1",
             "--niter_decay", "0", "--nThreads", "0", "--device", "cpu", "--no_progress"]
    assert main(train) == 0
    opt = finish_options(parse(["edit", "--name", "e", "--checkpoints_dir", str(tmp_path), "--device", "cpu"]),
                         is_train=False)
    assert (opt.ngf, opt.n_downsample_global, opt.dataroot) == (4, 2, str(data))  # from opt.txt
    model = load_run(tmp_path / "e", device="cpu")  # the same, from Python
    assert (model.spec.ngf, model.spec.n_downsample_global) == (4, 2)
    app = load_editor(model, data_spec(opt, train=False, read_images=False))
    assert len(app.scenes) == 2 and app.objects and not app.session.use_features
    assert call(app, "POST", "/api/edit", {"op": "change_label", "y": 0, "x": 0, "label": 21})[0] == 200


def test_concurrent_requests_queue_instead_of_interleaving(app):
    """Many clicks at once: every request is answered, and the history counts every edit once."""
    import threading

    results = []

    def click(i):
        body = {"op": "paint", "points": [[i % H, 0], [i % H, W - 1]], "label": 21 if i % 2 else 23, "width": 1}
        results.append(call(app, "POST", "/api/edit", body)[0])

    threads = [threading.Thread(target=click, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12
    assert len(app.session.undo_stack) == 12
    assert_consistent(app.session)
