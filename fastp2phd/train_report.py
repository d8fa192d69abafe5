"""What a training run reports: the loss logs (text, as the original writes it, and JSON lines),
TensorBoard scalars, and the web page of input labels, generated and real images."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import Pix2PixHDError
from .files import append_text, atomic_write
from .visualize import HTMLPage, label_to_image, tensor_to_image

if TYPE_CHECKING:
    from .train_step import Position

_TXT_LINE = re.compile(r"\(epoch: (\d+), iters: (\d+),")  # a line of losses in loss_log.txt
_PAGE_ROW = re.compile(r'src="images/epoch\d+_iter(\d+)_')  # a row of the web page: its images' total_steps


class TrainingReport:
    """The run folder's ``loss_log.txt``, ``loss_log.jsonl``, ``logs/`` (TensorBoard) and ``web/``.

    Only the main process writes; the others hold a report that does nothing.
    """

    def __init__(self, folder: Path, name: str, *, write: bool, html: bool, tensorboard: bool, label_nc: int):
        self.write = write
        self.label_nc = label_nc
        self.log_txt = folder / "loss_log.txt"
        self.log_jsonl = folder / "loss_log.jsonl"
        self.web = HTMLPage(folder / "web", f"Experiment name = {name}", refresh=30) if write and html else None
        self.tb = None
        if write and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise Pix2PixHDError("--tf_log needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(folder / "logs"))

    def log(self, values: dict[str, float], epoch: int, epoch_iter: int, total_steps: int, seconds: float) -> None:
        """One line of losses (averaged over the processes that trained, see Trainer)."""
        if not self.write:
            return
        text = (f"(epoch: {epoch}, iters: {epoch_iter}, time: {seconds:.3f}) "
                + " ".join(f"{k}: {v:.3f}" for k, v in values.items()))
        append_text(self.log_txt, text + "\n")
        append_text(self.log_jsonl, json.dumps({"epoch": epoch, "epoch_iter": epoch_iter, "total_steps": total_steps,
                                                "seconds_per_image": seconds, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, total_steps)

    def forget_after(self, position: Position) -> None:
        """A run resumed at ``position`` replays the steps logged after it: drop their lines from both logs."""
        if not self.write:
            return
        if self.log_jsonl.is_file():
            kept = []
            for line in _read_lines(self.log_jsonl):
                try:
                    if json.loads(line)["total_steps"] > position.total_steps:
                        continue
                except (ValueError, KeyError, TypeError):
                    pass  # not ours: keep it
                kept.append(line)
            _write_lines(self.log_jsonl, kept)
        if self.log_txt.is_file():  # its lines name the epoch and the images of it done, as the original's
            at = (position.epoch, position.epoch_iter)
            lines = _read_lines(self.log_txt)
            kept = [line for line in lines if not ((m := _TXT_LINE.match(line)) and tuple(map(int, m.groups())) > at)]
            if len(kept) < len(lines):
                _write_lines(self.log_txt, kept)
        if self.web is not None:  # the page goes on with the rows of the steps kept (the original lists every epoch)
            self.web.reload()
            rows: list[str] = []
            for row in self.web.body:
                if (m := _PAGE_ROW.search(row)) and int(m.group(1)) > position.total_steps:
                    if rows and rows[-1].startswith("<h3>"):
                        rows.pop()  # its header
                    continue
                rows.append(row)
            self.web.body = rows

    def display(self, batch: dict, fake: torch.Tensor, epoch: int, epoch_iter: int, total_steps: int) -> None:
        if self.web is None:
            return
        self.web.add_header(f"epoch {epoch}, iteration {epoch_iter}")
        self.web.add_images({
            "input_label": label_to_image(batch["label"][0], self.label_nc),
            "synthesized_image": tensor_to_image(fake[0]),
            "real_image": tensor_to_image(batch["image"][0]),
        }, prefix=f"epoch{epoch:03d}_iter{total_steps}")
        self.web.save()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# A log's lines as they are, bytes that are not UTF-8 (a user's note, a damaged line) included: they were a
# traceback on resume, and the lines kept are written back unchanged.
def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))
