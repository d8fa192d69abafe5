"""EditSession: every edit changes exactly its pixels, the generator input stays consistent,
undo/redo (and reset) are exact, bad requests change nothing, a saved scene regenerates through
``run_test``; and the editor's API (its HTTP safety is in test_editor_http.py)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from fastp2phd import ops
from support import tiny_model

from fastp2phd.data import THING_CLASSES, render_scene
from fastp2phd.editing import EditSession
from fastp2phd.editing.server import EditorApp, ObjectMask, Scene
from fastp2phd.options import finish_options
from fastp2phd.visualize import tensor_to_image

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


def stroke_reference(points, width):
    """Pixels within width/2 of the polyline, in float64, and the pixels within rounding of that edge."""
    yy, xx = np.mgrid[:H, :W].astype(float)
    nearest = np.full((H, W), np.inf)
    for (ay, ax), (by, bx) in list(zip(points, points[1:])) or [(points[0], points[0])]:
        d = np.array([by - ay, bx - ax], float)
        t = np.clip(((yy - ay) * d[0] + (xx - ax) * d[1]) / (d @ d), 0, 1) if d @ d else 0.0
        nearest = np.minimum(nearest, (yy - (ay + t * d[0])) ** 2 + (xx - (ax + t * d[1])) ** 2)
    radius2 = (width / 2) ** 2
    return nearest <= radius2, np.abs(nearest - radius2) < 1e-3


def test_paint_changes_the_stroke_pixels(session):
    before_label, before_inst, _ = session.state()
    points = [(5, 5), (5, 40), (20, 40)]
    session.paint(points, 21, width=5)
    label, inst, _ = session.state()
    changed = label != before_label
    near, _ = stroke_reference(points, 5)
    assert (label[near] == 21).all() and (inst[near] == 21).all()  # stuff: the class id is the instance id
    assert not (changed & ~near).any()
    assert_consistent(session)
    session.undo()
    session.paint(np.array(points), 21, width=5)  # points as an array paint the same stroke
    assert np.array_equal(session.state()[0], label) and np.array_equal(session.state()[1], inst)


def test_strokes_cover_exactly_the_pixels_near_the_polyline(session):
    """Random polylines, widths and repeated points: the windowed rasteriser paints the definition's pixels
    (pixels within float32 rounding of the brush's edge may go either way)."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        points = [(int(rng.integers(0, H)), int(rng.integers(0, W))) for _ in range(int(rng.integers(1, 6)))]
        if rng.random() < 0.2:
            points = points[:1] * 3
        width = int(rng.integers(1, 40))
        box, inside = session._stroke_region(points, width)
        got = np.zeros((H, W), bool)
        got[box[0]:box[1], box[2]:box[3]] = inside.numpy()
        near, edge = stroke_reference(points, width)
        assert not ((got != near) & ~edge).any(), (points, width)


@pytest.mark.parametrize("points, width, message", [
    ([(1, 1)] * 10_001, 8, "at most 10000 points"),
    ([(1, 1), (2, 2)], 129, "from 1 to 128"),
    ([(1, 1)], True, "from 1 to 128"),
    ([(0, 0), (H - 1, W - 1)] * 2000, 128, "too much for one edit"),
    ([(0, 0), (10 ** 6, 0)], 8, "outside"),
])
def test_strokes_beyond_the_caps_are_refused(session, points, width, message):
    with pytest.raises(ValueError, match=message):
        session.paint(points, 21, width=width)
    assert not session.undo_stack


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
    outside = np.zeros((6, 10), bool)
    outside[5, 9] = True  # clipped away whole: refused, not an id that is nowhere in the scene
    with pytest.raises(ValueError, match=f"none of the object lies in the scene with its corner at \\({H - 4}, {W - 6}\\)"):
        session.add_object(outside, H - 4, W - 6, 26)
    assert all(np.array_equal(a, b) for a, b in zip(session.state()[:2], (label, inst)))


def assert_one_vector_per_instance(s: EditSession) -> None:
    """Every instance holds one feature vector on all its pixels: what a save stores (one vector per id)."""
    for value in torch.unique(s.inst).tolist():
        vectors = s.feat[:, s.inst == value]
        assert torch.equal(vectors, vectors[:, :1].expand_as(vectors)), value


def test_a_stuff_class_added_with_a_style_restyles_its_whole_instance(session):
    """A stuff class's pixels are one instance (its id is the class id): pasting more of it with a style gives
    the whole instance that style, as set_style would, so the saved vector regenerates what the editor shows."""
    from fastp2phd.features import feature_map_from_vectors, instance_vectors

    before_label, before_inst, before_feat = session.state()
    ys, xs = np.nonzero(before_inst == 21)
    current = session.style_of(int(ys[0]), int(xs[0]))
    style = next(k for k in range(3) if k != current)
    mask = np.ones((4, 5), bool)
    y, x = next((y, x) for y in range(H - 4) for x in range(W - 5) if not (before_inst[y:y + 4, x:x + 5] == 21).any())
    assert session.add_object(mask, y, x, 21, style=style) == 21
    label, inst, feat = session.state()
    placed = np.zeros((H, W), bool)
    placed[y:y + 4, x:x + 5] = True
    assert (label[placed] == 21).all() and (inst[placed] == 21).all()
    assert np.array_equal(label[~placed], before_label[~placed]) and np.array_equal(inst[~placed], before_inst[~placed])
    vegetation = inst == 21
    centre = session.model.clusters[21][style].numpy()
    assert np.array_equal(feat[:, vegetation], np.repeat(centre[:, None], vegetation.sum(), 1))
    assert np.array_equal(feat[:, ~vegetation], before_feat[:, ~vegetation])
    assert session.style_of(int(ys[0]), int(xs[0])) == style
    assert_consistent(session)
    ids, vectors = instance_vectors(session.feat, session.inst)  # what save stores
    saved = feature_map_from_vectors(session.inst[None, None], dict(zip(ids.tolist(), torch.from_numpy(vectors))),
                                     torch.zeros_like(session.feat)[None])[0]
    assert torch.equal(saved, session.feat)
    assert session.undo() and np.array_equal(session.state()[2], before_feat)
    # The other edits that add pixels to an existing stuff instance give them its vector.
    car, cy, cx = a_car(session)
    for edit in (lambda: session.add_object(mask, 0, 0, 23), lambda: session.paint([(2, 2), (20, 50)], 21, 5),
                 lambda: session.change_label(cy, cx, 23), lambda: session.remove_object(*a_car(session)[1:]),
                 lambda: session.add_object(mask, H - 4, 0, 23, style=current)):
        edit()
        assert_one_vector_per_instance(session)
        assert_consistent(session)


def test_the_api_adds_a_stuff_class_with_a_style_as_the_session_does(app):
    twin = EditSession(app.model, app.scenes[0].label, app.scenes[0].inst, seed=0)
    ys, xs = np.nonzero(app.scenes[0].inst == 21)
    style = (twin.style_of(int(ys[0]), int(xs[0])) + 1) % 3
    body = {"op": "add_object", "object": 0, "y": 0, "x": 0, "label": 21, "style": style}
    assert call(app, "POST", "/api/edit", body)[0] == 200
    twin.add_object(app.objects[0].mask, 0, 0, 21, style=style)
    assert all(np.array_equal(a, b) for a, b in zip(app.session.state(), twin.state()))
    assert_one_vector_per_instance(app.session)


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


def test_style_previews_render_every_style_in_one_batch_on_a_crop(session):
    car, y, x = a_car(session)
    shapes = []
    handle = session.model.netG.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    previews = session.style_previews(y, x, margin=2)
    handle.remove()
    ys, xs = np.nonzero((session.inst == car).numpy())
    box = (max(0, ys.min() - 2), min(H, ys.max() + 3), max(0, xs.min() - 2), min(W, xs.max() + 3))
    assert len(shapes) == 1 and shapes[0][0] == 3 and len(previews) == 3
    assert shapes[0][2] * shapes[0][3] < H * W and shapes[0][2] % 4 == 0 and shapes[0][3] % 4 == 0  # a crop
    assert all(p.shape == (box[1] - box[0], box[3] - box[2], 3) for p in previews)
    assert not np.array_equal(previews[0], previews[1])


def test_style_of_names_the_applied_style(session):
    car, y, x = a_car(session)
    for style in (2, 0):
        session.set_style(y, x, style)
        assert session.style_of(y, x) == style
    session.feat[:, y, x] += 0.5  # features that are no cluster centre
    assert session.style_of(y, x) is None


def test_undo_redo_are_exact_and_reset_is_an_undoable_step(session):
    start = snapshot(session)
    assert not session.reset() and not session.undo_stack  # nothing to reset: no step
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
    edited = snapshot(session)
    assert session.reset()
    assert same(snapshot(session), start) and len(session.undo_stack) == 4
    assert session.undo() and same(snapshot(session), edited)  # the edits are back
    assert session.redo() and same(snapshot(session), start)
    assert_consistent(session)


def test_unsaved_follows_the_state_not_the_history(session, tmp_path):
    assert not session.unsaved
    session.paint([(3, 3)], 21, width=3)
    assert session.unsaved
    session.undo()
    assert not session.unsaved  # back to the scene as loaded
    session.redo()
    session.save(tmp_path / "edits")
    assert not session.unsaved
    session.paint([(9, 9)], 23, width=3)
    assert session.unsaved
    session.undo()
    assert not session.unsaved  # back to what was saved
    session.undo()
    assert session.unsaved


@pytest.mark.parametrize("edit", [
    lambda s, y, x: s.set_style(y, x, s.style_of(y, x)),  # the car's own style
    lambda s, y, x: s.paint([(1, 1), (1, 40)], 23, width=3),  # sky on sky
    lambda s, y, x: s.add_object(np.ones((3, 5), bool), 0, 0, 23),  # sky pasted on sky
    lambda s, y, x: s.add_object(np.ones((3, 5), bool), 0, 0, 23, style=s.style_of(0, 0)),  # ... in its own style
    lambda s, y, x: s.change_label(y, x, 26),  # a car stays a car
])
def test_an_edit_that_changes_no_pixel_is_no_edit(session, edit):
    """No step to undo, the redo history kept, nothing regenerated, and the scene no less saved."""
    session.paint([(20, 5), (20, 50)], 21, width=3)
    session.undo()
    car, y, x = a_car(session)
    before = snapshot(session)
    passes = []
    session.model.netG.register_forward_pre_hook(lambda module, args: passes.append(1))
    edit(session, y, x)
    assert session.changed_box is None and session.regenerate() is None and not passes
    assert not session.undo_stack and len(session.redo_stack) == 1 and not session.unsaved
    assert same(snapshot(session), before)


def test_maps_back_to_the_saved_ones_read_as_saved(session, tmp_path):
    """A scene is unsaved when its maps differ from the saved ones: after a reset to the scene as loaded, or a
    stroke painted over, it is not, whatever the history holds."""
    car, y, x = a_car(session)
    session.change_label(y, x, 24)
    assert session.reset() and not session.unsaved  # the scene as loaded, which counts as saved
    session.undo()
    session.save(tmp_path / "edits")
    session.reset()
    assert session.unsaved  # the scene as loaded is not what was saved
    session.undo()
    session.paint([(1, 1), (1, 9)], 21, width=3)
    assert session.unsaved
    session.paint([(1, 1), (1, 9)], 23, width=3)  # sky again, with the sky's features
    assert not session.unsaved and len(session.undo_stack) == 3


def test_history_is_bounded_and_unsaved_stays_honest(session):
    session.history = 3
    for i in range(5):
        session.paint([(i, 0)], 21 if i % 2 else 7, width=1)
    assert len(session.undo_stack) == 3
    while session.undo():
        pass
    assert session.unsaved  # not the scene as loaded: the two oldest edits are still in it


def test_a_session_without_history_edits_and_keeps_unsaved_honest(session, tmp_path):
    s = EditSession(session.model, *session.state()[:2], seed=0, history=0)
    before = s.state()
    s.paint([(5, 5)], 21, width=3)
    assert not np.array_equal(s.state()[0], before[0]) and not s.undo_stack and not s.undo()
    session.paint([(5, 5)], 21, width=3)
    assert s.unsaved and same(snapshot(s), snapshot(session))  # the edit as with a history
    assert_consistent(s)
    s.save(tmp_path / "edits")
    assert not s.unsaved
    s.paint([(9, 9)], 23, width=3)
    assert s.unsaved and not s.undo_stack


def test_lowering_the_history_drops_the_oldest_edits_at_once(session):
    for i in range(5):
        session.paint([(i, 0)], 21 if i % 2 else 7, width=1)
    session.undo()
    session.history = 2
    assert len(session.undo_stack) == 2 and len(session.redo_stack) == 1
    session.history = 0
    assert not session.undo_stack and not session.redo_stack and session.unsaved
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="whole number of edits"):
            session.history = bad
        with pytest.raises(ValueError, match="whole number of edits"):
            EditSession(session.model, *session.state()[:2], history=bad)
    assert session.history == 0


def test_remove_object_fills_it_with_the_surrounding_stuff(session):
    car, y, x = a_car(session)
    region = (session.inst == car).numpy()
    before_label, before_inst, _ = session.state()
    # What the ring of pixels around the car holds most (stuff only).
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(region).float()[None, None], 5, 1, 2)[0, 0].numpy() > 0
    ring = before_label[grown & ~region]
    ring = ring[~np.isin(ring, sorted(THING_CLASSES))]
    expected = int(np.bincount(ring).argmax())
    assert session.remove_object(y, x) == expected
    label, inst, feat = session.state()
    assert (label[region] == expected).all() and (inst[region] == expected).all()
    assert np.array_equal(label[~region], before_label[~region]) and np.array_equal(inst[~region], before_inst[~region])
    if (before_inst == expected).any():  # the stuff region keeps its one feature vector
        assert np.allclose(feat[:, region], feat[:, before_inst == expected][:, :1])
    assert_consistent(session)
    sky = np.argwhere(before_label == 23)[0]
    with pytest.raises(ValueError, match="only objects"):
        session.remove_object(int(sky[0]), int(sky[1]))


def fill_by_pooling_the_whole_scene(label: torch.Tensor, mask: torch.Tensor, label_nc: int) -> int | None:
    """remove_object's fill as first defined: the most common stuff class among the pixels within 2, 4, ... 64,
    then max(H, W) pixels of the object (max-pooling the whole scene), or None without stuff."""
    is_stuff = torch.ones(label_nc, dtype=torch.bool)
    is_stuff[[c for c in THING_CLASSES if c < label_nc]] = False
    for reach in (2, 4, 8, 16, 32, 64, max(label.shape)):
        grown = torch.nn.functional.max_pool2d(mask.float()[None, None], 2 * reach + 1, 1, reach)[0, 0] > 0
        ring = label[grown & ~mask]
        ring = ring[is_stuff[ring]]
        if ring.numel():
            return int(torch.bincount(ring, minlength=label_nc).argmax())
    return None


def random_objects_scene(rng, height: int, width: int, far_stuff: bool):
    """Stuff blocks with thing rectangles over them; with ``far_stuff``, one car over everything but a strip of
    road at the left edge, so the stuff lies beyond every early reach of the objects on the right."""
    label = np.repeat(np.repeat(rng.choice([7, 8, 11, 21, 23], (height // 8 + 1, width // 8 + 1)), 8, 0), 8, 1)
    label = label[:height, :width].copy()
    inst = label.copy()
    if far_stuff:
        label[:, 2:], inst[:, 2:] = 26, 26000
    for k in range(int(rng.integers(3, 9))):
        cls = int(rng.choice([24, 26]))
        h, w = int(rng.integers(1, height // 2)), int(rng.integers(1, width // 3))
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(2 if far_stuff else 0, width - w + 1))
        label[y:y + h, x:x + w], inst[y:y + h, x:x + w] = cls, cls * 1000 + 1 + k
    return label, inst


def test_remove_object_fills_as_pooling_the_whole_scene_does():
    """The fill is computed on the object's box grown by the reach only; on random scenes (stuff next to the
    objects, or only far away, or none) it equals the definition that pools the whole scene."""
    rng = np.random.default_rng(0)
    model = tiny_model()
    for i in range(24):
        height, width = (32, 64) if i % 3 else (64, 224)
        label, inst = random_objects_scene(rng, height, width, far_stuff=i % 3 == 0)
        if i == 23:
            label[:], inst[:] = 26, 26000  # no stuff at all
            label[5:9, 5:9], inst[5:9, 5:9] = 24, 24001
        s = EditSession(model, label, inst, seed=0)
        for value in [int(v) for v in np.unique(inst) if v >= 1000]:
            ys, xs = np.nonzero(s.state()[1] == value)
            if not len(ys):
                continue
            before = s.state()
            mask = torch.from_numpy(before[1] == value)
            expected = fill_by_pooling_the_whole_scene(torch.from_numpy(before[0]), mask, 35)
            if expected is None:
                with pytest.raises(ValueError, match="no stuff class"):
                    s.remove_object(int(ys[0]), int(xs[0]))
                continue
            assert s.remove_object(int(ys[0]), int(xs[0])) == expected, (i, value)
            label_now, inst_now, _ = s.state()
            assert (label_now[mask.numpy()] == expected).all() and (inst_now[mask.numpy()] == expected).all()
            assert np.array_equal(label_now[~mask.numpy()], before[0][~mask.numpy()])


def test_remove_object_pools_only_around_the_object(monkeypatch):
    """The pixels max-pooled for one removal depend on the object and on where its stuff is, not on the scene's
    size: the same object, as near to its stuff, pools the same pixels in a scene 16 times larger."""
    pooled = []
    max_pool2d = torch.nn.functional.max_pool2d

    def counting(x, kernel, *args, **kwargs):
        pooled.append(x.numel() * (kernel if isinstance(kernel, int) else max(kernel)))
        return max_pool2d(x, kernel, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "max_pool2d", counting)
    work = {}
    for height, width in ((144, 288), (288, 576)):
        label, inst = np.full((height, width), 26), np.full((height, width), 26000)
        label[:, :2], inst[:, :2] = 7, 7  # road at the left edge
        label[69:75, 141:147], inst[69:75, 141:147] = 24, 24000  # a person inside the car, beyond every reach
        label[40:44, 10:14], inst[40:44, 10:14] = 24, 24001  # a person 9 pixels from the road
        s = EditSession(tiny_model(), label, inst, seed=0)
        pooled.clear()
        assert s.remove_object(70, 142) == 7
        far = sum(pooled)
        pooled.clear()
        assert s.remove_object(41, 11) == 7
        work[height] = (far, sum(pooled))
    assert work[144] == work[288]
    # the six reaches pool the object's box grown by each (two 1-D pools of 2r+1 each); the last step pools nothing
    assert work[144][0] == sum(2 * (6 + 2 * r) ** 2 * (2 * r + 1) for r in (2, 4, 8, 16, 32, 64))


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


def full_of_cars():
    """A scene holding all 1000 instances class 26 (car) can have, one pixel each."""
    label, inst, _ = render_scene(H, W, seed=4)
    label.reshape(-1)[:1000] = 26
    inst.reshape(-1)[:1000] = 26000 + np.arange(1000)
    return label, inst


@pytest.mark.parametrize("edit", [lambda s: s.paint([(H - 1, W - 1)], 26, 1), lambda s: s.change_label(H - 1, W - 1, 26),
                                  lambda s: s.add_object(np.ones((2, 2), bool), H - 2, W - 2, 26)])
def test_a_thousand_and_first_instance_of_a_class_is_refused_with_a_sentence(edit):
    s = EditSession(tiny_model(), *full_of_cars(), seed=0)
    before = snapshot(s)
    with pytest.raises(ValueError, match="at most 1000 instances .*class 26 has them all"):
        edit(s)
    assert same(snapshot(s), before) and not s.undo_stack
    s.paint([(H - 1, W - 1)], 24, 1)  # other classes still have room
    assert s.instance_at(H - 1, W - 1) // 1000 == 24


def test_the_api_refuses_a_thousand_and_first_instance_with_400():
    app = EditorApp(tiny_model(), [Scene("cars", *full_of_cars())], [], trained_classes=[7, 11, 21, 23, 26])
    before = snapshot(app.session)
    status, result = call(app, "POST", "/api/edit", {"op": "paint", "points": [[H - 1, W - 1]], "label": 26, "width": 1})
    assert status == 400 and result["error"].startswith("a class holds at most 1000 instances")
    assert same(snapshot(app.session), before)


def test_session_without_features():
    label, inst, _ = render_scene(H, W, seed=5)
    s = EditSession(tiny_model(features=False), label, inst)
    s.change_label(0, 0, 21)
    assert_consistent(s)
    with pytest.raises(ValueError, match="no instance features"):
        s.style_options(0, 0)


@pytest.mark.parametrize("features", ["instance_feat", "label_feat"])
def test_saved_scene_regenerates_through_run_test(features, session, tmp_path):
    """Save writes a dataset folder; run_test (what `fastp2phd test` calls) reads the saved ids and the saved
    instance features, and generates exactly the editor's image (with --label_feat too: the editor keeps a
    vector per instance, which test reads per instance)."""
    import dataclasses

    from PIL import Image

    from fastp2phd.inference import run_test
    from fastp2phd.specs import DataSpec

    if features == "label_feat":
        session.model.spec = dataclasses.replace(session.spec, instance_feat=False, label_feat=True)
        session = EditSession(session.model, *session.state()[:2], seed=0)
    car, y, x = a_car(session)
    session.set_style(y, x, 1)
    session.paint([(3, 3), (3, 20)], 21, width=3)
    folder = session.save(tmp_path / "edits", "my_scene")
    label, inst, feat = session.state()
    assert np.array_equal(np.array(Image.open(folder / "test_label" / "my_scene.png")), label)
    assert np.array_equal(np.array(Image.open(folder / "test_inst" / "my_scene.png")).astype(np.int64), inst)
    assert np.array_equal(np.array(Image.open(folder / "test_img" / "my_scene.png")), session.image())
    session.model.clusters = None  # the saved features are all run_test needs
    data = DataSpec.for_model(session.spec, dataroot=str(folder), phase="test", resize_or_crop="none", train=False,
                              read_images=False)
    page = run_test(session.model, data, tmp_path / "web", progress=False)
    generated = np.array(Image.open(page.parent / "images" / "my_scene_synthesized_image.png"))
    assert np.array_equal(generated, session.image())


@pytest.mark.parametrize("features", ["instance_feat", "label_feat"])
def test_an_unedited_scene_shows_what_fastp2phd_test_generates(features, tmp_path):
    """A session samples its features as `fastp2phd test` does, so its image of an unedited scene is test's; with
    --label_feat that is one centre per label region, as the model was trained (every car shares one)."""
    import dataclasses

    from PIL import Image

    from fastp2phd.inference import run_test
    from fastp2phd.specs import DataSpec

    model = tiny_model()
    model.spec = dataclasses.replace(model.spec, instance_feat=features == "instance_feat",
                                     label_feat=features == "label_feat")
    label, inst, _ = render_scene(H, W, seed=4)
    for folder, array in (("test_label", label.astype(np.uint8)), ("test_inst", inst.astype(np.uint16))):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.fromarray(array).save(tmp_path / "data" / folder / "scene.png")
    data = DataSpec.for_model(model.spec, dataroot=str(tmp_path / "data"), phase="test", resize_or_crop="none",
                              train=False, read_images=False)
    page = run_test(model, data, tmp_path / "web", progress=False, seed=0)
    session = EditSession(model, label, inst, seed=0)
    assert np.array_equal(np.array(Image.open(page.parent / "images" / "scene_synthesized_image.png")), session.image())
    feat = session.state()[2]
    cars = [v for v in np.unique(inst) if v // 1000 == 26]
    vectors = {tuple(feat[:, inst == car][:, 0]) for car in cars}
    assert len(cars) == 2 and len(vectors) == (1 if features == "label_feat" else 2)


@pytest.mark.parametrize("features", ["instance_feat", "label_feat"])
def test_every_scene_opens_with_the_features_fastp2phd_test_gives_it(features, tmp_path):
    """`fastp2phd test` samples the scenes' features in turn from one generator: the editor opens each scene with
    the draws test makes for it, so every unedited scene shows test's image (not only the first); a scene saved
    with all its vectors draws nothing, in test and in the editor."""
    import dataclasses

    from PIL import Image

    from fastp2phd.editing.server import load_editor
    from fastp2phd.inference import run_test
    from fastp2phd.specs import DataSpec

    model = tiny_model()
    model.spec = dataclasses.replace(model.spec, instance_feat=features == "instance_feat",
                                     label_feat=features == "label_feat")
    for k in range(3):
        label, inst, _ = render_scene(H, W, seed=4 + k)
        for folder, array in (("test_label", label.astype(np.uint8)), ("test_inst", inst.astype(np.uint16))):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / "data" / folder / f"s{k}.png")
    data = DataSpec.for_model(model.spec, dataroot=str(tmp_path / "data"), phase="test", resize_or_crop="none",
                              train=False, read_images=False)
    for run in ("unsaved", "s0 saved"):
        page = run_test(model, data, tmp_path / run, progress=False, seed=3)
        app = load_editor(model, data, seed=3)
        for k in (2, 1, 0):  # (in any order)
            app.load_scene({"index": k})
            test_image = np.array(Image.open(page.parent / "images" / f"s{k}_synthesized_image.png"))
            assert np.array_equal(app.session.image(), test_image), (run, k)
        app.load_scene({"index": 0})
        app.session.set_style(0, 0, (app.session.style_of(0, 0) + 1) % 3)
        app.session.save(tmp_path / "data", "s0")


def test_without_instance_maps_every_label_region_is_one_instance(tmp_path):
    """A --no_instance model sees no instances (its dataset gives a map of zeros): a session takes each label region
    as one, so a change of label changes the class clicked, not the whole scene, and a saved scene regenerates
    through run_test, which reads its features per label region."""
    from PIL import Image

    from fastp2phd.editing.server import load_editor
    from fastp2phd.inference import run_test
    from fastp2phd.pix2pixhd import Pix2PixHD
    from fastp2phd.specs import DataSpec, ModelSpec

    torch.manual_seed(0)
    model = Pix2PixHD(ModelSpec(ngf=4, n_downsample_global=2, n_blocks_global=1, nef=4, n_downsample_E=2,
                                label_feat=True, no_instance=True)).eval()
    model.clusters = tiny_model().clusters
    label = render_scene(H, W, seed=4)[0]
    (tmp_path / "data" / "test_label").mkdir(parents=True)
    Image.fromarray(label.astype(np.uint8)).save(tmp_path / "data" / "test_label" / "scene.png")
    data = DataSpec.for_model(model.spec, dataroot=str(tmp_path / "data"), phase="test", resize_or_crop="none",
                              train=False, read_images=False)
    s = load_editor(model, data, save_dir=tmp_path / "edits").session
    ys, xs = np.nonzero(label == 26)
    s.change_label(int(ys[0]), int(xs[0]), 28)
    assert np.array_equal(s.state()[0], np.where(label == 26, 28, label))
    s.set_style(0, 0, (s.style_of(0, 0) + 1) % 3)
    s.paint([(20, 5), (20, 30)], 26, width=3)
    assert np.array_equal(s.state()[1], s.state()[0])  # one instance per class, its id the class's
    folder = s.save(tmp_path / "edits", "scene")
    page = run_test(model, data.replace(dataroot=str(folder)), tmp_path / "web", progress=False)
    assert np.array_equal(np.array(Image.open(page.parent / "images" / "scene_synthesized_image.png")), s.image())


def test_a_session_starts_from_given_instance_vectors(session):
    """vectors={id: vector} fixes those instances' features; the others are sampled as without it, and with
    every instance named the clusters are not needed."""
    car, y, x = a_car(session)
    label, inst, feat = session.state()
    vector = np.array([0.5, -1.25, 2.0], np.float32)
    s = EditSession(session.model, label, inst, seed=0, vectors={car: vector})
    region = inst == car
    assert np.array_equal(s.state()[2][:, region], np.repeat(vector[:, None], region.sum(), 1))
    assert np.array_equal(s.state()[2][:, ~region], feat[:, ~region])  # the same draws as without vectors
    assert_consistent(s)
    s.change_label(y, x, 24)
    assert s.reset() and np.array_equal(s.state()[2], EditSession(session.model, label, inst, seed=0,
                                                                   vectors={car: vector}).state()[2])
    everything = {int(v): feat[:, inst == v][:, 0] for v in np.unique(inst)}
    session.model.clusters = None
    assert np.array_equal(EditSession(session.model, label, inst, vectors=everything).state()[2], feat)
    for vectors, message in (({car: [1.0, 2.0]}, r"\(3,\) vectors"), ({"26000": vector}, r"\(3,\) vectors")):
        with pytest.raises(ValueError, match=message):
            EditSession(session.model, label, inst, vectors=vectors)
    with pytest.raises(ValueError, match="no instance features"):
        EditSession(tiny_model(features=False), label, inst, vectors={car: vector})


def test_a_saved_scene_reopens_with_its_saved_features(session, tmp_path):
    """load_editor on the folder the editor saved into (`fastp2phd edit --dataroot <run>/edits`) starts every
    saved scene from its saved vectors: the styles as chosen, and exactly the saved image."""
    from PIL import Image

    from fastp2phd.editing.server import load_editor
    from fastp2phd.specs import DataSpec

    car, y, x = a_car(session)
    session.set_style(y, x, (session.style_of(y, x) + 1) % 3)
    sky = np.argwhere(session.state()[0] == 23)[0]
    session.set_style(int(sky[0]), int(sky[1]), (session.style_of(int(sky[0]), int(sky[1])) + 2) % 3)
    session.add_object(np.ones((4, 4), bool), 2, 2, 26, style=1)
    folder = session.save(tmp_path / "edits", "my_scene")
    data = DataSpec.for_model(session.spec, dataroot=str(folder), phase="test", resize_or_crop="none", train=False,
                              read_images=False)
    app = load_editor(session.model, data, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(app.session.state(), session.state()))
    assert app.session.style_of(y, x) == session.style_of(y, x)
    assert np.array_equal(app.session.image(), np.array(Image.open(folder / "test_img" / "my_scene.png")))
    assert not app.session.unsaved


def test_save_refuses_names_that_are_not_file_names(session, tmp_path):
    for name in ("", "../up", "a/../b", ".hidden", "a/.b", "a//b", "/abs", "a/"):
        with pytest.raises(ValueError, match="plain file name"):
            session.save(tmp_path, name)
    assert not any(tmp_path.iterdir())


def test_scenes_of_one_name_in_two_subfolders_are_saved_apart_and_regenerate_apart(tmp_path):
    """test_label/a/s.png and test_label/b/s.png: the editor names them a/s and b/s, saves each under its
    own path, and `test` on the saved folder writes a result for each."""
    from PIL import Image

    from fastp2phd.data import create_dataset
    from fastp2phd.inference import run_test
    from fastp2phd.specs import DataSpec

    model = tiny_model()
    dataset = tmp_path / "data"
    for sub, seed in (("a", 1), ("b", 2)):
        label, inst, _ = render_scene(H, W, seed=seed)
        for kind, array in (("label", label.astype(np.uint8)), ("inst", inst.astype(np.uint16))):
            (dataset / f"test_{kind}" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(dataset / f"test_{kind}" / sub / "s.png")
    data = DataSpec.for_model(model.spec, dataroot=str(dataset), phase="test", resize_or_crop="none", train=False,
                              read_images=False)
    items = [create_dataset(data)[i] for i in range(2)]
    assert [item["name"] for item in items] == ["a/s", "b/s"]
    app = EditorApp(model, [Scene(item["name"], item["label"][0].numpy(), item["inst"][0].numpy()) for item in items],
                    [], save_dir=tmp_path / "edits", trained_classes=[7, 11, 21, 23, 26])
    for index in (0, 1):
        assert call(app, "POST", "/api/scene", {"index": index})[0] == 200
        status, result = call(app, "POST", "/api/save", {})
        assert status == 200 and result["name"] == items[index]["name"]
    for index, sub in enumerate("ab"):
        saved = np.array(Image.open(tmp_path / "edits" / "test_label" / sub / "s.png"))
        assert np.array_equal(saved, items[index]["label"][0].numpy())
    model.clusters = None  # the saved features are all run_test needs
    page = run_test(model, data.replace(dataroot=str(tmp_path / "edits")), tmp_path / "web", progress=False)
    results = [np.array(Image.open(page.parent / "images" / sub / "s_synthesized_image.png")) for sub in "ab"]
    assert not np.array_equal(*results)
    assert "a/s_synthesized_image.png" in page.read_text() and "b/s_synthesized_image.png" in page.read_text()


def test_two_scenes_whose_names_save_alike_refuse_to_overwrite_each_other(tmp_path):
    scenes = [Scene(name, *render_scene(H, W, seed=i)[:2]) for i, name in enumerate(("x y", "x_y"))]
    app = EditorApp(tiny_model(), scenes, [], save_dir=tmp_path / "edits", trained_classes=[7, 11, 21, 23, 26])
    status, result = call(app, "POST", "/api/save", {})
    assert status == 409 and "would be saved as x_y" in result["error"] and "rename one" in result["error"]
    assert not (tmp_path / "edits" / "test_label").exists()


@pytest.mark.parametrize("failing_write", range(5))  # label, instances, image, features, then the commit
def test_a_full_disk_midway_through_a_save_keeps_the_scene_s_previous_save_whole(tmp_path, monkeypatch, failing_write):
    from support import fill_disk_at_write

    scenes = [Scene("scene", *render_scene(H, W, seed=1)[:2])]
    app = EditorApp(tiny_model(), scenes, [], save_dir=tmp_path / "edits", trained_classes=[7, 11, 21, 23, 26])
    assert call(app, "POST", "/api/save", {})[0] == 200
    saved = sorted(p for p in (tmp_path / "edits").rglob("*") if p.is_file())
    before = [p.read_bytes() for p in saved]
    assert len(saved) == 4
    call(app, "POST", "/api/edit", {"op": "paint", "points": [[1, 1], [20, 40]], "label": 21, "width": 5})
    fill_disk_at_write(monkeypatch, failing_write)
    status, result = call(app, "POST", "/api/save", {})
    assert status == 500 and "disk is full" in result["error"] and "intact" in result["error"]
    assert sorted(p for p in (tmp_path / "edits").rglob("*") if p.is_file()) == saved  # no temporaries left
    assert [p.read_bytes() for p in saved] == before  # all four files of the previous save
    assert call(app, "GET", "/api/info")[1]["unsaved"] == [0]


# ----------------------------------------------------------------------------- the HTTP API


@pytest.fixture
def app(tmp_path) -> EditorApp:
    scenes = [Scene(f"scene{i}", *render_scene(H, W, seed=i)[:2]) for i in range(2)]
    objects = [ObjectMask("box", 26, np.ones((4, 6), bool))]
    return EditorApp(tiny_model(), scenes, objects, save_dir=tmp_path / "edits", trained_classes=[7, 11, 21, 23, 26])


def call(app, method, path, body=None):
    status, kind, payload = app.handle(method, path, json.dumps(body).encode() if body is not None else b"")
    return status, (json.loads(payload) if kind == "application/json" else payload)


def test_api_valid_requests(app):
    status, info = call(app, "GET", "/api/info")
    assert status == 200 and info["size"] == [H, W] and len(info["labels"]) == 35 and info["features"]
    assert info["labels"][26] == {"id": 26, "name": "car", "color": "#00008e", "thing": True, "trained": True,
                                  "styles": 3}
    assert info["labels"][28]["trained"] is False and info["labels"][25]["styles"] == 0
    status, page = call(app, "GET", "/")
    assert status == 200 and b"label-canvas" in page
    for name in ("image", "outlines", "object0", "download/label_ids", "download/instance_ids",
                 "download/label_colours"):
        status, png = call(app, "GET", f"/api/{name}.png")
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n", name
    status, result = call(app, "POST", "/api/edit", {"op": "paint", "points": [[1, 1], [1, 9]], "label": 21, "width": 3})
    assert status == 200 and result["undo"] == 1 and result["ms"] > 0 and result["unsaved"] == [0]
    car, y, x = a_car(app.session)
    status, inst = call(app, "GET", f"/api/instance?y={y}&x={x}")
    assert status == 200 and inst["name"] == "car" and inst["styles"] == 3 and inst["thing"]
    status, styles = call(app, "GET", f"/api/styles?y={y}&x={x}")
    assert status == 200 and len(styles["previews"]) == 3 and styles["previews"][0].startswith("data:image/png;base64,")
    assert styles["style"] == app.session.style_of(y, x)
    for body in ({"op": "set_style", "y": y, "x": x, "style": 1}, {"op": "add_object", "object": 0, "y": 2, "x": 2},
                 {"op": "change_label", "y": y, "x": x, "label": 24}, {"op": "undo"}, {"op": "redo"}, {"op": "reset"},
                 {"op": "undo"}, {"op": "remove_object", "y": 3, "x": 3}):
        assert call(app, "POST", "/api/edit", body)[0] == 200, body
    status, scene = call(app, "POST", "/api/scene", {"index": 1})
    assert status == 200 and scene["scene"] == 1


def test_label_ids_download_holds_ids_and_colours_are_a_preview(app):
    from PIL import Image

    ids = np.array(Image.open(io.BytesIO(call(app, "GET", "/api/download/label_ids.png")[1])))
    colours = np.array(Image.open(io.BytesIO(call(app, "GET", "/api/download/label_colours.png")[1])))
    assert np.array_equal(ids, app.session.label.numpy()) and colours.shape == (H, W, 3)


def test_each_scene_keeps_its_history(app):
    call(app, "POST", "/api/edit", {"op": "paint", "points": [[1, 1]], "label": 21, "width": 3})
    edited = snapshot(app.session)
    status, info = call(app, "POST", "/api/scene", {"index": 1})
    assert info["undo"] == 0 and info["unsaved"] == [0]
    call(app, "POST", "/api/edit", {"op": "paint", "points": [[5, 5]], "label": 7, "width": 3})
    status, info = call(app, "POST", "/api/scene", {"index": 0})
    assert info["undo"] == 1 and info["unsaved"] == [0, 1] and same(snapshot(app.session), edited)
    call(app, "POST", "/api/edit", {"op": "undo"})
    status, info = call(app, "POST", "/api/scene", {"index": 1})
    assert info["undo"] == 1 and info["unsaved"] == [1]  # scene 0 is back to as loaded, its redo kept
    assert 0 in app.sessions and app.sessions[0].redo_stack


def test_the_api_answers_an_edit_that_changes_nothing_as_no_edit(app):
    """Painting a stroke again changes nothing: the answer keeps the history, the unsaved marks and the views'
    version (no patches); a reset to the scene as loaded leaves no scene marked unsaved."""
    stroke = {"op": "paint", "points": [[1, 1], [1, 9]], "label": 21, "width": 3}
    status, first = call(app, "POST", "/api/edit", stroke)
    assert status == 200 and first["unsaved"] == [0] and first["view"]["patches"]
    status, again = call(app, "POST", "/api/edit", stroke)
    assert status == 200 and (again["undo"], again["redo"], again["unsaved"]) == (1, 0, [0])
    assert again["view"] == {"from": first["view"]["to"], "to": first["view"]["to"], "patches": []}
    status, reset = call(app, "POST", "/api/edit", {"op": "reset"})
    assert status == 200 and reset["undo"] == 2 and reset["unsaved"] == [] and reset["view"]["patches"]


def test_untouched_scenes_are_not_kept(app):
    call(app, "POST", "/api/scene", {"index": 1})
    call(app, "POST", "/api/scene", {"index": 0})
    assert list(app.sessions) == [0]


def test_save_writes_the_scene_for_fastp2phd_test(app, tmp_path):
    call(app, "POST", "/api/edit", {"op": "paint", "points": [[1, 1]], "label": 21, "width": 3})
    status, result = call(app, "POST", "/api/save", {})
    assert status == 200 and result["unsaved"] == [] and result["name"] == "scene0"
    assert (tmp_path / "edits" / "test_label" / "scene0.png").is_file()
    assert (tmp_path / "edits" / "test_features" / "scene0.npz").is_file()


def test_app_without_a_save_folder_says_so():
    app = EditorApp(tiny_model(), [Scene("s", *render_scene(H, W, seed=0)[:2])], [])
    status, result = call(app, "POST", "/api/save", {})
    assert status == 400 and "without a folder" in result["error"]


def test_trained_classes_are_guessed_from_clusters_and_scenes_without_a_record():
    label, inst, _ = render_scene(H, W, seed=0)
    app = EditorApp(tiny_model(), [Scene("s", label, inst)], [])
    trained = {entry["id"] for entry in app.labels if entry["trained"]}
    assert trained == set(np.unique(label).tolist()) | set(tiny_model().clusters) and "guessed" in app.trained_source


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/api/edit", {"op": "explode"}, 400, "unknown operation"),
    ("POST", "/api/edit", {"op": "change_label", "y": 999, "x": 0, "label": 7}, 400, "outside"),
    ("POST", "/api/edit", {"op": "change_label", "y": "1", "x": 0, "label": 7}, 400, "must be an integer"),
    ("POST", "/api/edit", {"op": "change_label", "y": 1, "x": 0, "label": 99}, 400, "not a class id"),
    ("POST", "/api/edit", {"op": "paint", "points": "nope", "label": 7}, 400, "points must be"),
    ("POST", "/api/edit", {"op": "paint", "points": [[1, 1]] * 10_001, "label": 7}, 400, "at most 10000 points"),
    ("POST", "/api/edit", {"op": "paint", "points": [[1, 1]], "label": 7, "width": 10 ** 400}, 400, "from 1 to 128"),
    ("POST", "/api/edit", {"op": "paint", "points": [[1, 1]], "label": 7, "width": 1e300}, 400, "must be an integer"),
    ("POST", "/api/edit", {"op": "remove_object", "y": 0, "x": 0}, 400, "only objects"),
    ("POST", "/api/edit", {"op": "add_object", "object": 5, "y": 0, "x": 0}, 400, "does not exist"),
    ("POST", "/api/scene", {"index": 9}, 400, "does not exist"),
    ("POST", "/api/scene", [1], 400, "JSON object"),
    ("GET", "/api/styles?y=a", None, 400, "give the pixel"),
    ("GET", "/api/instance?y=-1&x=0", None, 400, "give the pixel"),
    ("GET", "/api/nothing.png", None, 404, "no such image"),
    ("GET", "/api/object-1.png", None, 404, "no such image"),
    ("GET", "/api/object1.png", None, 404, "no such image"),
    ("GET", '/api/download/image".png', None, 404, "no such download"),
])
def test_api_invalid_requests_change_nothing(app, method, path, body, status, message):
    before = snapshot(app.session)
    got, result = call(app, method, path, body)
    assert got == status and message in result["error"]
    assert same(snapshot(app.session), before)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'{"op": "paint", "width": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_api_malformed_bodies_get_a_sentence(app, body, message):
    status, kind, payload = app.handle("POST", "/api/edit", body)
    assert status == 400 and message in json.loads(payload)["error"]


def test_edit_command_loads_a_trained_run_and_its_saves_feed_fastp2phd_test(tmp_path):
    """`fastp2phd edit` builds its editor from a run's checkpoint and opt.txt (model options not repeated),
    knows the classes the run trained on, and a scene it saves regenerates with `fastp2phd test`."""
    from PIL import Image

    from fastp2phd.cli import main, parse
    from fastp2phd.data import make_synthetic
    from fastp2phd.data.synthetic import scene_seed
    from fastp2phd.editing.server import load_editor
    from fastp2phd.inference import load_run
    from fastp2phd.options import data_spec
    from fastp2phd.train_state import trained_classes

    data = make_synthetic(tmp_path / "data", num_train=4, num_test=2, height=H, width=W, seed=1)
    run = ["--name", "e", "--checkpoints_dir", str(tmp_path), "--device", "cpu", "--no_progress"]
    train = ["train", *run, "--dataroot", str(data), "--fineSize", "64", "--loadSize", "64", "--resize_or_crop", "none",
             "--ngf", "4", "--n_downsample_global", "2", "--n_blocks_global", "1", "--ndf", "4", "--n_layers_D", "2",
             "--no_vgg_loss", "--niter", "1", "--niter_decay", "0", "--nThreads", "0", "--instance_feat",
             "--feat_num", "3", "--nef", "4", "--n_downsample_E", "2"]
    assert main(train) == 0
    assert main(["encode-features", *run, "--resize_or_crop", "none"]) == 0
    opt = finish_options(parse(["edit", *run]), is_train=False)
    assert (opt.ngf, opt.n_downsample_global, opt.dataroot) == (4, 2, str(data))  # from opt.txt
    model = load_run(tmp_path / "e", device="cpu")  # the same, from Python
    assert (model.spec.ngf, model.spec.n_downsample_global) == (4, 2) and model.clusters
    trained = trained_classes(tmp_path / "e")  # recorded while training: the classes of the training scenes
    seen = set()
    for i in range(4):
        seen |= set(np.unique(render_scene(H, W, scene_seed(1, "train", i))[0]).tolist())
    assert set(trained) == seen
    app = load_editor(model, data_spec(opt, train=False, read_images=False), trained_classes=trained,
                      save_dir=tmp_path / "e" / "edits")
    assert len(app.scenes) == 2 and app.objects and app.session.use_features
    assert {entry["id"] for entry in app.labels if entry["trained"]} == seen

    car, y, x = a_car(app.session)
    assert call(app, "POST", "/api/edit", {"op": "change_label", "y": y, "x": x, "label": 24})[0] == 200
    assert call(app, "POST", "/api/edit", {"op": "paint", "points": [[2, 2], [2, 30]], "label": 21, "width": 3})[0] == 200
    assert call(app, "POST", "/api/save", {})[0] == 200
    name = app.scenes[0].name
    assert main(["test", *run, "--dataroot", str(tmp_path / "e" / "edits"), "--resize_or_crop", "none",
                 "--results_dir", str(tmp_path / "results")]) == 0
    generated = tmp_path / "results" / "e" / "test_latest" / "images" / f"{name}_synthesized_image.png"
    assert np.array_equal(np.array(Image.open(generated)), app.session.image())


def test_the_command_the_editor_shows_regenerates_with_its_checkpoint_precision_and_device(tmp_path, monkeypatch):
    """The `fastp2phd test` command shown after a save names the editor's checkpoint, precision (test defaults
    to fp32, edit to auto) and device, so it regenerates the editor's images, and is quoted for a shell."""
    import shlex

    from fastp2phd.cli import parse
    from fastp2phd.editing import server
    from fastp2phd.errors import InvalidArgumentError

    shown = []

    def load_editor(*args, test_command, **kwargs):
        shown.append(test_command)
        raise InvalidArgumentError("enough")

    monkeypatch.setattr(server, "load_editor", load_editor)
    model = tiny_model()
    model.precision = "bf16"
    run = tmp_path / "my runs" / "it's"
    assert server.main_edit(model, None, name="it's", run_folder=run, host="127.0.0.1", port=0, max_scenes=1,
                            seed=0, which_epoch="7") == 1
    argv = shlex.split(shown[0])
    assert argv[1:4] == ["-m", "fastp2phd", "test"]
    opt = parse(argv[3:])
    assert (opt.name, opt.checkpoints_dir, opt.which_epoch, opt.dataroot, opt.resize_or_crop, opt.precision,
            opt.device) == ("it's", str(tmp_path / "my runs"), "7", str(run / "edits"), "none", "bf16", "cpu")


def test_concurrent_requests_queue_instead_of_interleaving(app):
    """Many clicks at once: every request is answered, and the history counts every edit once."""
    import threading

    results = []

    def click(i):
        body = {"op": "paint", "points": [[i % H, 0], [i % H, W - 1]], "label": 21 if i % 2 else 7, "width": 1}
        results.append(call(app, "POST", "/api/edit", body)[0])

    threads = [threading.Thread(target=click, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12
    assert len(app.session.undo_stack) == 12
    assert_consistent(app.session)


def test_local_radius_covers_what_an_output_pixel_sees_and_refuses_global_generators():
    from fastp2phd.models.generator import local_radius

    netG = tiny_model(norm="batch").netG
    radius = local_radius(netG)
    assert radius is not None and radius > 0
    x = torch.randn(1, netG.options["input_nc"], 96, 96, dtype=torch.float64)
    probe = x.clone().requires_grad_(True)
    netG.double()(probe)[0, :, 50, 45].sum().backward()  # which inputs this output pixel sees
    ys, xs = torch.nonzero(probe.grad.abs().sum(dim=(0, 1)), as_tuple=True)
    reach = max(int((ys - 50).abs().max()), int((xs - 45).abs().max()))
    assert reach == radius  # enough, and no more (the crops stay small)
    assert local_radius(tiny_model().netG) is None  # instance norm: every output sees the whole image
    assert local_radius(tiny_model(norm="batch").netG.train()) is None  # batch statistics


def test_a_local_generator_regenerates_only_what_an_edit_reaches_and_matches_a_full_regeneration():
    label, inst, _ = render_scene(128, 256, seed=4)
    s = EditSession(tiny_model(norm="batch"), label, inst, seed=0)
    sizes = []
    s.model.netG.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[2:])))
    s.image()
    car, y, x = a_car(s)
    edits = [lambda: s.paint([(20, 30), (24, 60)], 8, 6), lambda: s.change_label(y, x, 28),
             lambda: s.paint([(0, 0), (2, 255)], 11, 4), lambda: s.undo(), lambda: s.redo(), lambda: s.reset(),
             lambda: s.paint([(127, 255)], 11, 3), lambda: s.paint([(60, 100)], 8, 4) or s.paint([(70, 200)], 8, 4)]
    for edit in edits:
        sizes.clear()
        edit()
        image = s.image()
        assert len(sizes) == 1  # one pass of G, on a crop or the whole image
        with torch.inference_mode():
            full = s.model.netG(s.input)[0]
        torch.testing.assert_close(s._image, full, rtol=0, atol=1e-5)
        assert np.abs(image.astype(int) - tensor_to_image(full).astype(int)).max() <= 1
    sizes.clear()
    s.paint([(20, 30), (24, 60)], 7, 6)
    s.image()
    assert sizes[0][0] * sizes[0][1] < 128 * 256 / 2  # a short stroke: a crop of under half the image


def test_features_encoded_from_a_picture_or_a_tensor_are_the_encoders():
    # The picture image() returns, or the loader's (3, H, W) tensor in [-1, 1], the same photo either way.
    model = tiny_model()
    label, inst, _ = render_scene(H, W, seed=4)
    picture = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    photo = (torch.from_numpy(picture).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = model.encode_features(photo[None], torch.as_tensor(inst)[None, None].long(),
                                         torch.as_tensor(label)[None, None].long())[0]
    for image in (picture, photo):
        feat = EditSession(model, label, inst, image=image).state()[2]
        assert np.array_equal(feat, expected.numpy())
    for bad in (picture.transpose(2, 0, 1), picture.astype(np.float32), photo[:, :-1]):
        with pytest.raises(ValueError, match=f"the image to encode must be a \\({H}, {W}, 3\\) uint8 picture"):
            EditSession(model, label, inst, image=bad)
