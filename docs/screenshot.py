"""Make docs/editor.png: the editor on the demo run, after a few edits, in headless Chromium.

    make demo
    .venv/bin/python docs/screenshot.py [demo_output/checkpoints/demo] [docs/editor.png]

Needs Playwright and Debian's chromium (as the browser test does).
"""
from __future__ import annotations

import shutil
import sys

import numpy as np


def main(run_folder: str = "demo_output/checkpoints/demo", out: str = "docs/editor.png") -> None:
    from playwright.sync_api import sync_playwright

    from fastp2phd.editing.server import load_editor, serve
    from fastp2phd.inference import load_run
    from fastp2phd.specs import DataSpec, read_opt_txt
    from fastp2phd.train_state import trained_classes

    model = load_run(run_folder)
    dataroot = read_opt_txt(run_folder)["dataroot"]
    data = DataSpec.for_model(model.spec, dataroot=dataroot, phase="test", resize_or_crop="none")
    app = load_editor(model, data, trained_classes=trained_classes(run_folder))
    inst = app.session.inst.numpy()
    cars = [v for v in np.unique(inst) if 26000 <= v < 27000]
    ys, xs = np.nonzero(inst == max(cars, key=lambda v: (inst == v).sum()))
    car = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    height, width = inst.shape
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with serve(app, "127.0.0.1", 0) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1320, "height": 900})
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_selector("body[data-ready='1']", timeout=60000)
        box = page.locator("#label-canvas").bounding_box()
        scale = box["width"] / width

        def at(y, x):
            return box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale

        def wait(prefix):
            page.wait_for_function(f"() => document.getElementById('status').textContent.startsWith({prefix!r})")

        page.click("#palette button[data-label='21']")  # a tree line over the buildings
        page.mouse.move(*at(height // 3, width // 8))
        page.mouse.down()
        page.mouse.move(*at(height // 3, width // 3), steps=20)
        page.mouse.up()
        wait("paint:")
        page.check("#tool-style")  # the car's styles, the second applied
        page.mouse.click(*at(*car))
        page.wait_for_selector("#styles figure.style-preview >> nth=1")
        page.locator("#styles figure.style-preview").nth(1).click()
        wait("set_style:")
        page.mouse.click(*at(*car))  # the previews again, with the applied one marked
        page.wait_for_selector("#styles figure.applied")
        page.screenshot(path=out, full_page=True)
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
