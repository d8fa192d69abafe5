"""How a spec field is also a command-line option: ``option(default, help, group, parse=..., choices=...)``.

The spec dataclasses (``fastp2phd.specs``) declare each original pix2pixHD option once, as a field made
with ``option``: its default, its help in ``-h`` and the section it is listed in, the values it takes and
how its text is read. ``fastp2phd.options`` builds the argparse flags from these fields; nothing here
knows argparse (a parser raises ``InvalidArgumentError``, a ValueError, which the command line words).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable

from .errors import InvalidArgumentError

# The sections of `-h` the options are listed in.
EXPERIMENT, SIZES, DATA_LOADING = "experiment", "input/output sizes", "data loading"
GENERATOR, FEATURES, TRAINING, LOGGING = "generator", "instance-wise features", "training", "logging and saving"


@dataclass(frozen=True)
class Option:
    """How a spec field reads as a command-line option (its ``metadata["option"]``)."""

    help: str
    group: str  # the section of `-h` it is listed in
    parse: Callable[[str], Any] | None = None  # text -> value (raises ValueError); None: the text itself
    choices: tuple[str, ...] | None = None
    bare: Any = None  # the value of the flag given without one (--compile alone), where it may be


def option(default: Any, help: str, group: str, *, parse: Callable[[str], Any] | None = None,
           choices: tuple[str, ...] | None = None, bare: Any = None) -> Any:
    """A dataclass field that is also the option --<name>: ``default``, its ``help`` in ``-h``'s section
    ``group``, the values it takes (``choices``, or what ``parse`` accepts: an int or float field is read with
    int or float unless told) and, with ``bare``, the value of the flag given alone. A bool is a switch."""
    if parse is None and isinstance(default, (int, float)) and not isinstance(default, bool):
        parse = type(default)
    return field(default=default, metadata={"option": Option(help, group, parse, choices, bare)})


def _number(text: str, kind: type, what: str, ok: Callable[[Any], bool]) -> Any:
    """``text`` as a ``kind`` that passes ``ok``, or InvalidArgumentError "must be a WHAT, got 'TEXT'"."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise InvalidArgumentError(f"must be a {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return _number(text, int, "non-negative integer", lambda v: v >= 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "finite number, 0 or more", lambda v: math.isfinite(v) and v >= 0)


def dataset_size(text: str) -> float:
    """A number of images: a non-negative integer, or 'inf' for all."""
    return math.inf if text == "inf" else float(_number(text, int, "non-negative integer or 'inf'", lambda v: v >= 0))


def run_name(text: str) -> str:
    """A run's name: its folder inside --checkpoints_dir and --results_dir (names joined by '/', as the original
    allows), never a path that leads out of them, where a save would replace files of another run or none."""
    parts = text.replace("\\", "/").split("/")
    if not text.strip() or text.startswith(("/", "\\")) or PurePath(text).is_absolute() or ".." in parts:
        raise InvalidArgumentError(f"must be a folder name inside --checkpoints_dir (names joined by '/', no '..' and "
                                   f"not absolute: choose the place with --checkpoints_dir), got {text!r}")
    return text


def epoch_label(text: str) -> str:
    """A checkpoint's label ('latest', an epoch): the start of file names in the run folder."""
    if not text.strip() or "/" in text or "\\" in text or text in (".", ".."):
        raise InvalidArgumentError(f"must be 'latest' or an epoch number (the start of a checkpoint's file name, "
                                   f"without '/'), got {text!r}")
    return text


def port(text: str) -> int:
    return _number(text, int, "port number, 0 to 65535 (0: any free one)", lambda v: 0 <= v <= 65535)
