"""Turning tensors into pictures, and the HTML pages that show them."""
from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image

from .files import atomic_write, remove_leftover_temporaries, write_text


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8 (a single channel is repeated).

    As the original's ``tensor2im``, so saved images are byte for byte the original code's: (t + 1) / 2 * 255 in
    float32, clipped to [0, 255] and truncated (not rounded)."""
    t = t.detach().float().cpu()
    array = ((t + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]


def label_to_image(label: torch.Tensor, label_nc: int) -> np.ndarray:
    """(1, H, W) label ids -> (H, W, 3) colours; with label_nc 0 the input is an image."""
    from .data import colorize_labels

    if label_nc == 0:
        return tensor_to_image(label)
    return colorize_labels(label[0].detach().cpu().numpy(), label_nc)


def save_image(array: np.ndarray, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


class HTMLPage:
    """A page of image rows (``web_dir/index.html`` with pictures in ``web_dir/images``).

    Rows are kept in memory and the page is rewritten atomically on ``save``.
    """

    def __init__(self, web_dir: str | os.PathLike, title: str, refresh: int = 0):
        self.web_dir = Path(web_dir)
        self.image_dir = self.web_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        remove_leftover_temporaries(self.web_dir)  # what a killed earlier run was writing
        remove_leftover_temporaries(self.image_dir, recursive=True)  # (images of a/s scenes are in images/a/)
        self.title = title
        self.refresh = refresh
        self.body: list[str] = []

    def add_header(self, text: str) -> None:
        self.body.append(f"<h3>{html.escape(text)}</h3>")

    def add_text(self, text: str) -> None:
        self.body.append(f"<p>{html.escape(text)}</p>")

    def add_images(self, images: dict[str, np.ndarray], prefix: str, width: int = 256) -> None:
        """One row: each image saved as images/<prefix>_<name>.png and shown with its name."""
        cells = []
        for name, array in images.items():
            # The scene's own name, spaces included: evaluate finds <name>_synthesized_image.png by it, and "a b"
            # and "a_b" stay two files. The link is URL-quoted ('#', '%', '?' in a name broke it).
            filename = f"{prefix}_{name}.png"
            save_image(array, self.image_dir / filename)
            link = html.escape(quote(f"images/{filename}"))
            cells.append(
                f'<td style="text-align:center"><a href="{link}">'
                f'<img src="{link}" style="width:{width}px"></a><br>{html.escape(name)}</td>'
            )
        self.body.append("<table><tr>" + "".join(cells) + "</tr></table>")

    def reload(self) -> None:
        """Take the rows of the page this folder holds (a resumed run goes on with the page it was writing)."""
        try:
            text = (self.web_dir / "index.html").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return
        start, end = text.find("</h2>\n"), text.rfind("\n</body>")
        if 0 <= start < end:
            self.body = [row for row in text[start + len("</h2>\n"):end].split("\n") if row]

    def save(self) -> Path:
        meta = f'<meta http-equiv="refresh" content="{self.refresh}">' if self.refresh else ""
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{meta}<title>{html.escape(self.title)}</title></head>"
                f"<body><h2>{html.escape(self.title)}</h2>\n" + "\n".join(self.body) + "\n</body></html>\n")
        path = self.web_dir / "index.html"
        write_text(path, page)
        return path
