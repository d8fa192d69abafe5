"""Whether a dataset's folders pair up: pix2pixHD pairs a label map with the instance map and photo at the same
sorted position, so one missing or extra file silently pairs every later scene with another scene's files.

Names may differ by a suffix that is the same for a whole folder (Cityscapes' ``_gtFine_labelIds``,
``_gtFine_instanceIds``, ``_leftImg8bit``): each file's key is its path inside its folder, without the
extension and without the suffix all of the folder's files share. Folders whose keys have nothing in common
follow naming schemes that cannot be compared, and are paired by position alone, as the original does.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple


def _keys(folder: str, paths: Sequence[str]) -> List[str]:
    stems = [os.path.splitext(os.path.relpath(p, folder))[0].replace(os.sep, "/") for p in paths]
    if len(stems) < 2:
        return stems  # (one file's common suffix is its whole name)
    common = os.path.commonprefix([s[::-1] for s in stems])
    return [s[:len(s) - len(common)] for s in stems]


def unpaired(lists: Dict[str, Tuple[str, List[str]]]) -> str | None:
    """A sentence saying which files do not pair up, or None; ``lists`` maps 'label', 'inst', 'image' or 'feat'
    to (folder, its sorted files), every list as long as the label maps'."""
    label_folder, labels = lists["label"]
    label_keys = _keys(label_folder, labels)
    for kind, (folder, paths) in lists.items():
        keys = _keys(folder, paths)
        if kind == "label" or keys == label_keys or not set(keys) & set(label_keys):
            continue
        i = next(i for i, (a, b) in enumerate(zip(label_keys, keys)) if a != b)
        found, wanted = set(keys), set(label_keys)
        missing, extra = [k for k in label_keys if k not in found], [k for k in keys if k not in wanted]
        parts = [f"has no file for {_some(missing)}" if missing else "",
                 f"has {_some(extra)}, which {label_folder} has no label map for" if extra else ""]
        detail = f" ({folder} {' and '.join(p for p in parts if p)})" if missing or extra else ""
        return (f"Files are paired by sorted position, but label map {labels[i]} would be paired with {paths[i]}, "
                f"a file of another name{detail}; give every label map exactly one file of the same name in each "
                f"folder.")
    return None


def _some(keys: List[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
