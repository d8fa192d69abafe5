"""An edit session's history: what every edit replaced, for undo and redo, and revision
numbers that name the states (equal revisions mean equal maps), so that "unsaved" is honest
even after undoing past a save or dropping the oldest edits."""
from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError

__all__ = ["Change", "EditHistory", "differing"]


def differing(patches, maps, box) -> torch.Tensor:
    """(h, w) bool over ``box`` (y0, y1, x0, x1): where ``patches`` (label, inst, feat inside the box; feat None
    without features) differ from the whole maps ``maps`` (label (H, W), inst (H, W), feat (F, H, W) or None)."""
    y0, y1, x0, x1 = box
    out = (patches[0] != maps[0][y0:y1, x0:x1]) | (patches[1] != maps[1][y0:y1, x0:x1])
    if patches[2] is not None:
        out |= (patches[2] != maps[2][:, y0:y1, x0:x1]).any(dim=0)
    return out


@dataclass
class Change:
    """The maps inside a box before and after an edit (what undo and redo swap in)."""

    box: tuple[int, int, int, int]  # y0, y1, x0, x1
    before: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
    after: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
    revision: int  # names the state this change leads to


_revisions = itertools.count(1)


class EditHistory:
    """Undo and redo stacks of at most ``limit`` changes each (the oldest dropped first); ``limit`` 0 keeps none."""

    def __init__(self, limit: int) -> None:
        self.undo_stack: list[Change] = []
        self.redo_stack: list[Change] = []
        self._base_revision = 0  # the state before the oldest change still in the history
        self.saved_revision = 0  # the scene as loaded counts as saved: nothing of the user's is in it
        self.limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        """A new limit applies at once: the changes beyond it are dropped now, not at the next edit."""
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 0:
            raise InvalidArgumentError(f"the history holds a whole number of edits, 0 or more, got {limit!r}")
        self._limit = int(limit)
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest changes beyond the limit (the state before the oldest kept one becomes the base) and
        the redos farthest from the current state beyond it."""
        excess = len(self.undo_stack) - self._limit
        if excess > 0:
            self._base_revision = self.undo_stack[excess - 1].revision
            del self.undo_stack[:excess]
        del self.redo_stack[:max(0, len(self.redo_stack) - self._limit)]

    @property
    def revision(self) -> int:
        """Names the current state: 0 as loaded; equal revisions mean equal maps."""
        return self.undo_stack[-1].revision if self.undo_stack else self._base_revision

    @property
    def unsaved(self) -> bool:
        """The maps differ from the last save (or, before one, from the scene as loaded)."""
        return self.revision != self.saved_revision

    def mark_saved(self) -> None:
        self.saved_revision = self.revision

    def record(self, box, before, after) -> None:
        """A new edit: push it (a fresh revision), drop the oldest beyond the limit, forget what was undone."""
        self.undo_stack.append(Change(box, before, after, next(_revisions)))
        self.redo_stack.clear()
        self._trim()  # (with limit 0 the edit is the base at once: undo has nothing, "unsaved" stays honest)

    def undo(self) -> Change | None:
        """The change to revert (moved to the redo stack), or None."""
        if not self.undo_stack:
            return None
        change = self.undo_stack.pop()
        self.redo_stack.append(change)
        return change

    def redo(self) -> Change | None:
        """The change to apply again (moved back to the undo stack), or None."""
        if not self.redo_stack:
            return None
        change = self.redo_stack.pop()
        self.undo_stack.append(change)
        return change
