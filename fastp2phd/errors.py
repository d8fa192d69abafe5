"""The errors a user can fix: each message is one sentence saying what is wrong and how to fix it.

The command line prints any of them as ``fastp2phd <command>: <message>`` and exits with
status 1, never with a traceback. The specific kinds also derive from the builtin a
caller would expect (a missing file is a FileNotFoundError, bad data a ValueError).
"""
from __future__ import annotations


class Pix2PixHDError(Exception):
    """A failure with a one-sentence message for the user."""


class InvalidArgumentError(Pix2PixHDError, ValueError):
    """A value given to fastp2phd (an argument, an option, the contents of a map) that it cannot use."""


class FileMissingError(Pix2PixHDError, FileNotFoundError):
    """A file fastp2phd was asked to read that is not there."""


class CheckpointReadError(Pix2PixHDError, ValueError):
    """A file that should hold tensors (a checkpoint, a train state, VGG19 weights) cannot be read as one."""


class CheckpointReadFileNotFound(CheckpointReadError, FileNotFoundError):
    """A checkpoint (or weights) file that does not exist."""


class DiskFullError(Pix2PixHDError, OSError):
    """A save that did not fit the disk (or the file-size limit); what was saved before is intact."""


class EvaluationError(Pix2PixHDError, ValueError):
    """Evaluation cannot run (missing or unpaired files, missing weights, a wrong segmentation model)."""
