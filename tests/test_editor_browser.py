"""The web editor in a real browser: headless Chromium (Debian's package) driven by Playwright.

One page session paints, relabels (a class the model never saw, behind "show all"), picks a style,
switches scenes and comes back to its history, resets and undoes the reset, saves, and undoes
everything back to the first image pixel for pixel; the saved folder regenerates the same image
through ``run_test``. A hostile page on another site, and a page reached through a rebound DNS name,
try to drive the editor and change nothing. Skipped when Playwright or Chromium is missing
(.ci/run installs both).
"""
from __future__ import annotations

import base64
import io
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from support import tiny_model

from fastp2phd.data import render_scene
from fastp2phd.editing.server import EditorApp, ObjectMask, Scene, serve

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
# evil.test and rebind.test both resolve to this machine, as a rebinding DNS server would make them.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP evil.test 127.0.0.1, MAP rebind.test 127.0.0.1"]
H, W = 48, 96


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def editor(tmp_path):
    scenes = [Scene(f"scene{i}", *render_scene(H, W, seed=4 + i)[:2]) for i in range(2)]
    trained = set(np.unique(scenes[0].label).tolist()) | set(np.unique(scenes[1].label).tolist())
    app = EditorApp(tiny_model(), scenes, [ObjectMask("box", 26, np.ones((6, 10), bool))], save_dir=tmp_path / "edits",
                    trained_classes=trained)
    with serve(app, "127.0.0.1", 0) as server:
        yield app, server.server_address[1]


def a_car(inst: np.ndarray) -> tuple[int, int]:
    cars = [v for v in np.unique(inst) if 26000 <= v < 27000]
    ys, xs = np.nonzero(inst == max(cars, key=lambda v: (inst == v).sum()))
    return int(ys[len(ys) // 2]), int(xs[len(xs) // 2])


class EditorPage:
    """The editor page, driven as a user would."""

    def __init__(self, page, url: str, app: EditorApp):
        self.page, self.app = page, app
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        self.box = page.locator("#label-canvas").bounding_box()
        self.scale = page.evaluate("() => document.getElementById('label-canvas').width / document.getElementById('image').width")

    def at(self, y: int, x: int) -> tuple[float, float]:
        return self.box["x"] + (x + 0.5) * self.scale, self.box["y"] + (y + 0.5) * self.scale

    def image(self) -> np.ndarray:
        """The generated image the page shows (its canvas's pixels). Its label colours and outlines, and the image,
        must equal the server's whole views: edits draw patches over them, and a misplaced one would show here."""
        urls = self.page.evaluate(
            "() => ['image', 'label-canvas', 'outlines'].map((id) => document.getElementById(id).toDataURL())")
        image, label, outlines = (np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
                                  for url in urls)
        s, session = int(self.scale), self.app.session
        assert np.array_equal(label[::s, ::s, :3], session.label_image())
        assert np.array_equal(outlines[::s, ::s], session.instance_outlines())
        assert np.array_equal(image[..., :3], session.image()) and (image[..., 3] == 255).all()
        return image[..., :3]

    def wait_status(self, text: str) -> str:
        self.page.wait_for_function(f"() => document.getElementById('status').textContent.startsWith({text!r})")
        return self.page.text_content("#status")

    def clear_status(self) -> None:
        """Before an action whose status line starts as the last one's did (two undos), so the wait sees the new one."""
        self.page.evaluate("document.getElementById('status').textContent = ''")

    def select_scene(self, index: int) -> str:
        self.clear_status()
        self.page.select_option("#scene", str(index))
        return self.wait_status("scene loaded")

    def click(self, selector: str, then: str) -> str:
        self.clear_status()
        self.page.click(selector)
        return self.wait_status(then)


def test_editing_history_scenes_and_save(editor, browser, tmp_path):
    from fastp2phd.inference import run_test
    from fastp2phd.specs import DataSpec

    app, port = editor
    page = EditorPage(browser.new_page(viewport={"width": 1400, "height": 1000}), f"http://127.0.0.1:{port}/", app)
    initial = page.image()
    car = a_car(app.scenes[0].inst)

    # A stroke of vegetation with the brush: the status reports the time the page waited.
    page.page.click("#palette button[data-label='21']")
    page.page.mouse.move(*page.at(4, 4))
    page.page.mouse.down()
    page.page.mouse.move(*page.at(6, 40), steps=12)
    page.page.mouse.up()
    assert "ms from click to new image" in page.wait_status("paint:")
    painted = page.image()
    assert not np.array_equal(painted, initial)

    # The car becomes a bus: a class the model never saw, offered only behind "show all".
    assert not page.page.is_visible("#palette button[data-label='28']")
    page.page.check("#show-all")
    page.page.check("#tool-label")
    page.page.click("#palette button[data-label='28']")
    page.page.mouse.click(*page.at(*car))
    page.wait_status("change_label:")
    page.page.click("#palette button[data-label='26']")
    page.clear_status()
    page.page.mouse.click(*page.at(*car))
    page.wait_status("change_label:")

    # The car's styles; the applied one is marked, then another is applied and marked.
    page.page.check("#tool-style")
    page.page.mouse.click(*page.at(*car))
    page.page.wait_for_selector("#styles figure.style-preview >> nth=2")
    page.page.locator("#styles figure.style-preview").nth(1).click()
    page.wait_status("set_style:")
    assert page.page.locator("#styles figure.applied").get_attribute("data-style") == "1"
    styled = page.image()
    page.clear_status()
    page.page.locator("#styles figure.style-preview").nth(1).click()  # the style it has: no step
    page.wait_status("set_style: nothing to change")
    assert np.array_equal(page.image(), styled)

    # Another scene and back: the history is still there, and the scene list marks unsaved scenes.
    page.select_scene(1)
    assert page.page.is_disabled("#undo")
    page.select_scene(0)
    assert not page.page.is_disabled("#undo") and np.array_equal(page.image(), styled)
    assert page.page.locator("#scene option").first.text_content().endswith("*")

    # Reset is one step that undo takes back; previews are cleared by it.
    page.click("#reset", "reset:")
    assert np.array_equal(page.image(), initial) and page.page.locator("#styles figure").count() == 0
    page.click("#undo", "undo:")
    assert np.array_equal(page.image(), styled)

    # Save: the folder regenerates the page's image through run_test, and the scene is no longer unsaved.
    assert "saved scene0" in page.click("#save", "saved")
    assert not page.page.locator("#scene option").first.text_content().endswith("*")
    data = DataSpec.for_model(app.model.spec, dataroot=str(tmp_path / "edits"), phase="test", resize_or_crop="none",
                              train=False, read_images=False)
    result = run_test(app.model, data, tmp_path / "web", progress=False)
    assert np.array_equal(np.array(Image.open(result.parent / "images" / "scene0_synthesized_image.png")), styled)

    for _ in range(4):  # style, label back, label, stroke
        page.click("#undo", "undo:")
    assert np.array_equal(page.image(), initial) and page.page.is_disabled("#undo")

    # Two edits in flight at once (a double Ctrl+Y): their answers are drawn in turn, and the page ends up
    # showing what the server holds (image() compares all three views).
    page.page.evaluate("() => Promise.all([edit({op: 'redo'}), edit({op: 'redo'})])")
    assert len(app.session.undo_stack) == 2 and not np.array_equal(page.image(), initial)


HOSTILE_PAGES = {"/": """<!DOCTYPE html><title>hostile</title><script>
(async () => {
  const editor = "http://127.0.0.1:%(port)d";
  const results = await Promise.allSettled([
    fetch(editor + "/api/edit", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                 body: JSON.stringify({op: "reset"})}),
    fetch(editor + "/api/edit", {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify({op: "paint", points: [[1, 1]], label: 7, width: 40})}),
    fetch(editor + "/api/info").then((r) => r.text()),
  ]);
  document.body.dataset.read = results[2].status === "fulfilled" ? "yes" : "no";
  document.title = "done";
})();
</script>""", "/form": """<!DOCTYPE html><title>hostile form</title>
<form method="POST" action="http://127.0.0.1:%(port)d/api/edit" enctype="text/plain">
<input name='{"op": "reset", "x": "' value='"}'></form><script>document.forms[0].submit();</script>"""}


def test_other_sites_cannot_drive_the_editor(editor, browser):
    app, port = editor
    app.session.paint([(2, 2), (2, 30)], 21, width=3)  # something a reset would take away
    before = (len(app.session.undo_stack), app.session.label.clone())

    class Hostile(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = (HOSTILE_PAGES.get(self.path, "") % {"port": port}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    hostile = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        evil = f"http://evil.test:{hostile.server_address[1]}"
        page.goto(evil + "/")  # fetches, simple and preflighted
        page.wait_for_function("() => document.title === 'done'")
        assert page.evaluate("() => document.body.dataset.read") == "no"  # no CORS: the answer is unreadable
        with page.expect_navigation(url=f"http://127.0.0.1:{port}/api/edit") as navigation:
            page.goto(evil + "/form")  # a plain form post, which needs no CORS
        assert navigation.value.status == 403 and "may not change this editor" in page.content()
        # DNS rebinding: the attacker's name now points at the editor; the editor refuses that Host.
        response = page.goto(f"http://rebind.test:{port}/")
        assert response.status == 403 and "answers requests to 127.0.0.1" in page.content()
        answer = page.evaluate("""async () => { const r = await fetch('/api/edit', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({op: 'reset'})}); return r.status; }""")
        assert answer == 403
    finally:
        hostile.shutdown()
        hostile.server_close()
    assert len(app.session.undo_stack) == before[0] and app.session.label.equal(before[1])
