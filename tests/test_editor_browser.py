"""The web editor in a real browser: headless Chromium (Debian's package) driven by Playwright.

Paints a stroke, changes a label, picks a style, undoes all three, and checks that the
displayed image changed and came back pixel for pixel. Skipped when Playwright or Chromium
is missing (.ci/run installs both). With FASTP2PHD_SCREENSHOT=path the final page is saved
there too (that is how the README's screenshot is made).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import tiny_model

from fastp2phd.data import render_scene
from fastp2phd.editing.server import EditorApp, ObjectMask, Scene, serve

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def drive_editor(url: str, screenshot: Path, car: tuple[int, int]) -> None:
    """Edit in the page at ``url``; asserts the image changes and comes back after undo."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=30000)

            def settled_image() -> bytes:
                page.wait_for_function(
                    "() => { const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0; }")
                page.wait_for_timeout(100)
                return page.locator("#image").screenshot()

            def wait_status(text: str) -> None:
                page.wait_for_function(f"() => document.getElementById('status').textContent.startsWith({text!r})")

            initial = settled_image()
            scale = page.evaluate("() => document.getElementById('label-canvas').width") / page.evaluate(
                "() => document.getElementById('image').naturalWidth")
            box = page.locator("#label-canvas").bounding_box()

            def at(y: int, x: int) -> tuple[float, float]:
                return box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale

            # A stroke of vegetation with the brush.
            page.click("#palette button[data-label='21']")
            page.mouse.move(*at(4, 4))
            page.mouse.down()
            page.mouse.move(*at(6, 40), steps=12)
            page.mouse.up()
            wait_status("paint:")
            painted = settled_image()
            assert painted != initial

            # The car becomes a bus.
            page.check("#tool-label")
            page.click("#palette button[data-label='28']")
            page.mouse.click(*at(*car))
            wait_status("change_label:")
            relabelled = settled_image()
            assert relabelled != painted

            # Back to a car, then pick its second style from the previews.
            page.click("#palette button[data-label='26']")
            page.mouse.click(*at(*car))
            wait_status("change_label:")
            page.check("#tool-style")
            page.mouse.click(*at(*car))
            page.wait_for_selector("#styles img.style-preview >> nth=2")
            page.locator("#styles img.style-preview").nth(1).click()
            wait_status("set_style:")
            settled_image()
            page.screenshot(path=str(screenshot), full_page=True)

            for _ in range(4):  # style, label back, label, stroke
                page.click("#undo")
                wait_status("undo:")
            assert settled_image() == initial
            assert page.locator("#undo").is_disabled()
        finally:
            browser.close()


def test_editor_in_headless_chromium(tmp_path):
    label, inst, _ = render_scene(48, 96, seed=4)
    scenes = [Scene("scene0", label, inst)]
    app = EditorApp(tiny_model(), scenes, [ObjectMask("box", 26, np.ones((6, 10), bool))])
    cars = [v for v in np.unique(inst) if 26000 <= v < 27000]
    car_id = max(cars, key=lambda v: (inst == v).sum())
    ys, xs = np.nonzero(inst == car_id)
    car = (int(ys[len(ys) // 2]), int(xs[len(xs) // 2]))
    server = serve(app, "127.0.0.1", 0)
    try:
        screenshot = tmp_path / "editor.png"
        drive_editor(f"http://127.0.0.1:{server.server_address[1]}/", screenshot, car)
        assert screenshot.stat().st_size > 1000
        if os.environ.get("FASTP2PHD_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["FASTP2PHD_SCREENSHOT"])
    finally:
        server.shutdown()
