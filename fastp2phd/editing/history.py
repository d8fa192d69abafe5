"""An edit session's history: what every edit replaced, for undo and redo, and whether the maps
differ from the ones last saved, counted pixel by pixel as changes come and go (so "unsaved" is
honest after undoing back to a save, a reset to the scene as loaded, or dropping the oldest edits)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError

__all__ = ["Change", "EditHistory", "Maps", "differing"]

Maps = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # label (H, W), inst (H, W), feat (F, H, W) or None


def differing(patches: Maps, maps: Maps, box) -> torch.Tensor:
    """(h, w) bool over ``box`` (y0, y1, x0, x1): where ``patches`` (label, inst, feat inside the box) differ from
    the whole ``maps``."""
    y0, y1, x0, x1 = box
    out = (patches[0] != maps[0][y0:y1, x0:x1]) | (patches[1] != maps[1][y0:y1, x0:x1])
    if patches[2] is not None:
        out |= (patches[2] != maps[2][:, y0:y1, x0:x1]).any(dim=0)
    return out


@dataclass
class Change:
    """The maps inside a box before and after an edit (what undo and redo swap in)."""

    box: tuple[int, int, int, int]  # y0, y1, x0, x1
    before: Maps
    after: Maps


class EditHistory:
    """Undo and redo stacks of at most ``limit`` changes each (the oldest dropped first); ``limit`` 0 keeps none.
    ``saved`` are the maps as loaded, which count as saved: nothing of the user's is in them."""

    def __init__(self, limit: int, saved: Maps) -> None:
        self.undo_stack: list[Change] = []
        self.redo_stack: list[Change] = []
        self._saved = saved  # never written to: edits write the session's maps, and a save replaces these
        self._unsaved_pixels = 0  # how many pixels of the session's maps differ from them
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
        """Drop the oldest changes beyond the limit and the redos farthest from the current state beyond it."""
        del self.undo_stack[:max(0, len(self.undo_stack) - self._limit)]
        del self.redo_stack[:max(0, len(self.redo_stack) - self._limit)]

    @property
    def unsaved(self) -> bool:
        """The maps differ from the last save (or, before one, from the scene as loaded)."""
        return self._unsaved_pixels > 0

    def mark_saved(self, maps: Maps) -> None:
        """``maps`` (the session's) were saved: copies of them are what "unsaved" compares with from now on."""
        self._saved = tuple(None if m is None else m.clone() for m in maps)
        self._unsaved_pixels = 0

    def _replaced(self, box, old: Maps, new: Maps) -> None:
        """``old`` patches of the maps in ``box`` became ``new``: count the box's pixels differing from the saved."""
        self._unsaved_pixels += int(differing(new, self._saved, box).sum())
        self._unsaved_pixels -= int(differing(old, self._saved, box).sum())

    def record(self, box, before: Maps, after: Maps) -> None:
        """A new edit: push it, drop the oldest beyond the limit, forget what was undone."""
        self._replaced(box, before, after)
        self.undo_stack.append(Change(box, before, after))
        self.redo_stack.clear()
        self._trim()

    def undo(self) -> Change | None:
        """The change to revert (moved to the redo stack), or None."""
        if not self.undo_stack:
            return None
        change = self.undo_stack.pop()
        self.redo_stack.append(change)
        self._replaced(change.box, change.after, change.before)
        return change

    def redo(self) -> Change | None:
        """The change to apply again (moved back to the undo stack), or None."""
        if not self.redo_stack:
            return None
        change = self.redo_stack.pop()
        self.undo_stack.append(change)
        self._replaced(change.box, change.before, change.after)
        return change
