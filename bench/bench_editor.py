"""The editor as its user feels it: the demo model's architecture on a 256x512 synthetic scene.

* ``editor page``: from the page's own edit call to the new image loaded in headless Chromium
  (the latency the status line reports), for a brush stroke and a label change. The page runs the
  same ``edit()`` a click runs; the time includes Playwright's round trip (5-8 ms on 2 cores, where the
  server, Playwright's driver and Chromium share them), so it overstates what the page's status line reports.
  Skipped without Playwright and Chromium.
* ``style previews``: rendering every style (6) of a car, on a crop around it (``fastp2phd``)
  against rendering the whole scene once per style (``full scene``, what the editor did before).

The weights are untrained (timing does not depend on them) and the clusters random. The model runs as
``fastp2phd edit`` runs it by default: ``optimize_for_inference`` and ``--precision auto`` (bf16 where the
device has native bfloat16).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from harness import measure

from fastp2phd.data import render_scene
from fastp2phd.demo import DEMO_MODEL
from fastp2phd.editing import EditSession
from fastp2phd.editing.server import EditorApp, Scene, serve
from fastp2phd import optimize_for_inference
from fastp2phd.pix2pixhd import Pix2PixHD, fastest_precision
from fastp2phd.visualize import tensor_to_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def demo_model(settings) -> Pix2PixHD:
    torch.manual_seed(0)
    model = Pix2PixHD(DEMO_MODEL).to(settings.device).eval()
    generator = torch.Generator().manual_seed(1)
    model.clusters = {c: torch.randn(DEMO_MODEL.n_clusters, DEMO_MODEL.feat_num, generator=generator)
                      for c in (7, 8, 11, 17, 20, 21, 22, 23, 24, 26)}
    model.precision = fastest_precision(settings.device)  # as `fastp2phd edit` runs it by default
    return optimize_for_inference(model)


def scene_size(settings) -> tuple[int, int]:
    return (64, 128) if settings.smoke else (256, 512)


@pytest.fixture(scope="module")
def editor_page(settings):
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed")
    height, width = scene_size(settings)
    label, inst, _ = render_scene(height, width, seed=4)
    app = EditorApp(demo_model(settings), [Scene("bench", label, inst)], [])
    with serve(app, "127.0.0.1", 0) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector("body[data-ready='1']", timeout=60000)
        yield app, page
        browser.close()


# The page's own edit(): request, then wait for the new image to load.
PAGE_EDIT = "async (body) => { const t = performance.now(); await edit(body); return performance.now() - t; }"


@pytest.mark.parametrize("op", ["paint stroke", "change label"])
def test_editor_page_latency(benchmark, settings, editor_page, op):
    app, page = editor_page
    height, width = scene_size(settings)
    cars = [int(v) for v in torch.unique(app.session.inst) if 26000 <= int(v) < 27000]
    ys, xs = torch.nonzero(app.session.inst == cars[0], as_tuple=True)
    car = (int(ys[len(ys) // 2]), int(xs[len(xs) // 2]))
    turn = [0]

    def one_edit():  # alternate two classes, so every edit changes the scene and regenerates
        turn[0] += 1
        if op == "paint stroke":
            points = [[height // 2, x] for x in range(width // 8, width // 2, 2)]
            body = {"op": "paint", "points": points, "label": 8 if turn[0] % 2 else 7, "width": 8}
        else:
            body = {"op": "change_label", "y": car[0], "x": car[1], "label": 28 if turn[0] % 2 else 26}
        page.evaluate(PAGE_EDIT, body)

    measure(benchmark, settings, suite="editor page", case=f"{op}, {height}x{width}", provider="fastp2phd",
            fn=one_edit, rounds=None if settings.smoke else 21)


@pytest.mark.parametrize("provider", ["fastp2phd", "full scene"])
def test_style_previews(benchmark, settings, provider):
    height, width = scene_size(settings)
    label, inst, _ = render_scene(height, width, seed=4)
    session = EditSession(demo_model(settings), label, inst)
    cars = [int(v) for v in torch.unique(session.inst) if 26000 <= int(v) < 27000]
    car = max(cars, key=lambda v: int((session.inst == v).sum()))
    ys, xs = torch.nonzero(session.inst == car, as_tuple=True)
    y, x = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])

    def whole_scene():  # every style rendered on the full scene, then cropped
        styles = session.style_options(y, x)
        batch = session.input.repeat(styles.shape[0], 1, 1, 1)
        where = session.inst == car
        for k in range(styles.shape[0]):
            batch[k, -DEMO_MODEL.feat_num:, where] = styles[k][:, None]
        # At the model's precision, as style_previews runs it (bf16 where the CPU has native bfloat16): the rows then
        # differ by the crop alone, not by the precision too.
        with torch.inference_mode(), session.model.precision_scope(batch.device):
            images = session.model.netG(batch).float()
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        return [tensor_to_image(img[:, y0:y1, x0:x1]) for img in images]

    fn = (lambda: session.style_previews(y, x)) if provider == "fastp2phd" else whole_scene
    measure(benchmark, settings, suite="style previews", case=f"{DEMO_MODEL.n_clusters} styles of a car, "
            f"{height}x{width}", provider=provider, fn=fn, images=DEMO_MODEL.n_clusters)
    assert len(fn()) == DEMO_MODEL.n_clusters and all(isinstance(p, np.ndarray) for p in fn())
