"""Interactive semantic manipulation (pix2pixHD section 4): an edit session over one scene.

An ``EditSession`` holds a scene's label map, instance map and feature map, the
generator's input built from them (one-hot labels, boundary map, features), and the
generated image. Every edit changes the maps inside a bounding box, rebuilds the
input only there (the boundary map over the box grown by one pixel, through
``ops.boundary_map``), records what it replaced so that ``undo``/``redo`` restore
the exact previous state, and marks the image for regeneration (without an
autograd graph): of the whole image, or with a local generator only of the part the
edits can reach (``image``). A bad coordinate, label, mask or style raises ``ValueError``
before anything changes. Every edit, ``reset`` included, can be undone; an edit that
changes no pixel (a style the instance has, sky painted on sky) is none: no step, nothing
to regenerate, the scene no less saved.

The session ties together jobs that live in modules of their own: the history
(``history``), the input building (``scene_input``), brush strokes (``strokes``),
styles and their previews (``styles``), what to regenerate (``regeneration``) and saving
the scene (``scene_files``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..data import THING_CLASSES, colorize_labels
from ..features import class_of, feature_map_from_vectors
from ..models.generator import local_radius
from ..visualize import tensor_to_image
from .history import Change, EditHistory, differing
from .regeneration import regenerate
from .regions import mask_box, surrounding_stuff, thing_objects
from .scene_files import save_scene
from .scene_input import checked_vectors, encoder_image, new_input, refresh_input
from .strokes import MAX_BRUSH_WIDTH, MAX_STROKE_POINTS, MAX_STROKE_WORK, stroke_region
from .styles import class_styles, grow_box, outlines, preview_images

__all__ = ["EditSession", "MAX_BRUSH_WIDTH", "MAX_STROKE_POINTS", "MAX_STROKE_WORK"]


class EditSession:
    """Edit one scene with a trained pix2pixHD model and regenerate its image.

    ``model`` is a ``fastp2phd.pix2pixhd.Pix2PixHD`` (with ``clusters`` when it uses
    instance features). ``label`` and ``inst`` are (H, W) integer arrays or tensors
    (Cityscapes convention: thing instances have ids class*1000+k, stuff pixels their
    class id); a model without instance maps (--no_instance) sees none, so each label region is one instance, its id
    the class's (``inst`` is not used: its dataset gives zeros). Features come from ``image`` (encoded: an (H, W, 3)
    uint8 picture, as ``image()`` returns, or a (3, H, W) float tensor in [-1, 1]) when given, else from the
    clusters, sampled with ``seed`` (or ``generator``) as ``fastp2phd test`` samples them (a centre per instance; per
    label region with --label_feat, as the model was trained); ``vectors``
    ({instance id: (feat_num,) vector}, such as a saved scene's ``<phase>_features/<name>.npz`` through
    ``features.load_instance_vectors``) gives the instances it names their vector instead, so a saved scene
    reopens with the styles it was saved with (the clusters are then needed only for instances it does not name).
    """

    def __init__(self, model, label, inst, *, image=None, seed: int = 0, history: int = 100,
                 vectors: Mapping[int, Any] | None = None, generator: torch.Generator | None = None):
        self.model = model.eval()
        self.spec = model.spec
        self.device = next(model.parameters()).device
        self.label_nc = self.spec.label_nc
        if self.label_nc == 0:
            raise InvalidArgumentError("editing needs a model trained on label maps (--label_nc > 0)")
        self.use_features = self.spec.uses_features
        self.generator = generator or torch.Generator(device=self.device).manual_seed(seed)
        label = torch.as_tensor(np.asarray(label)).to(self.device, torch.int64)
        inst = torch.as_tensor(np.asarray(inst)).to(self.device, torch.int32)
        if label.dim() != 2 or label.shape != inst.shape:
            raise InvalidArgumentError(f"label and instance maps must be (H, W) of one size, got {tuple(label.shape)} and "
                             f"{tuple(inst.shape)}")
        self._check_labels(label)
        model.check_size(label)
        if self.spec.no_instance:  # (`fastp2phd test` reads a saved scene's features per label region too)
            inst = label.to(torch.int32)
        self.height, self.width = label.shape
        feat = None
        if vectors is not None and not self.use_features:
            raise InvalidArgumentError("this model has no instance features, so no feature vectors to start from")
        if self.use_features:
            vectors = checked_vectors(vectors or {}, self.spec.feat_num, self.device)
            if image is not None:
                image = encoder_image(image, self.height, self.width, self.device)
                with torch.no_grad():
                    feat = self.model.encode_features(image[None], inst[None, None], label[None, None])[0]
            elif set(torch.unique(inst).tolist()) - set(vectors):
                feat = self._sample_features(label if self.spec.label_feat else inst)
            else:  # every instance has its vector: nothing to sample (as `fastp2phd test` does)
                feat = torch.zeros(self.spec.feat_num, *inst.shape, device=self.device)
            if vectors:
                feat = feature_map_from_vectors(inst[None, None], vectors, feat[None])[0]
        self._initial = (label.clone(), inst.clone(), None if feat is None else feat.clone())
        self.edits = EditHistory(history, self._initial)
        self.label, self.inst, self.feat = label, inst, feat
        self.input = new_input(self.spec, self.height, self.width, self.device)
        self._image: torch.Tensor | None = None  # (3, H, W) float32, as of the last regenerate()
        self._changed: tuple[int, int, int, int] | None = None  # the input's box changed since then
        self._radius = local_radius(self.model.netG)  # None: every change regenerates the whole image
        self._refresh((0, self.height, 0, self.width))

    # ------------------------------------------------------------------ state
    @property
    def history(self) -> int:
        """How many edits ``undo`` can revert at most (0: none); lowering it drops the oldest edits at once."""
        return self.edits.limit

    @history.setter
    def history(self, limit: int) -> None:
        self.edits.limit = limit

    @property
    def undo_stack(self) -> list[Change]:
        return self.edits.undo_stack

    @property
    def redo_stack(self) -> list[Change]:
        return self.edits.redo_stack

    @property
    def unsaved(self) -> bool:
        """The maps differ from the last ``save`` (or, before one, from the scene as loaded), pixel for pixel."""
        return self.edits.unsaved

    def _refresh(self, box) -> None:
        """Rebuild the input inside ``box`` (``scene_input.refresh_input``; its boundary map changes one
        pixel beyond) and mark it for regeneration."""
        refresh_input(self.input, self.spec, box, self.label, self.inst, self.feat)
        changed = grow_box(box, 1, self.height, self.width)
        if self._changed is not None:
            changed = tuple(f(a, b) for f, a, b in zip((min, max, min, max), self._changed, changed))
        self._changed = changed

    def _sample_features(self, regions: torch.Tensor) -> torch.Tensor:
        """(F, H, W): a cluster centre of its class for each region (an id of the (H, W) ``regions``), drawn in turn."""
        from ..features import sample_feature_map

        clusters = self.model.clusters
        if clusters is None:
            raise InvalidArgumentError("this model uses instance features: give the session an image to encode, or load "
                             "clusters into model.clusters")
        return sample_feature_map(regions[None, None], clusters, self.spec.feat_num, generator=self.generator)[0]

    def _apply(self, box, label_patch, inst_patch, feat_patch) -> None:
        """Replace the maps inside ``box``, remember the change, and refresh the input there; unless that
        changes no pixel."""
        after = (label_patch, inst_patch, feat_patch)
        if not differing(after, (self.label, self.inst, self.feat), box).any():
            return
        y0, y1, x0, x1 = box
        before = (self.label[y0:y1, x0:x1].clone(), self.inst[y0:y1, x0:x1].clone(),
                  None if self.feat is None else self.feat[:, y0:y1, x0:x1].clone())
        self._write(box, after)
        self.edits.record(box, before, after)

    def _write(self, box, patches) -> None:
        y0, y1, x0, x1 = box
        label_patch, inst_patch, feat_patch = patches
        self.label[y0:y1, x0:x1] = label_patch
        self.inst[y0:y1, x0:x1] = inst_patch
        if self.feat is not None:
            self.feat[:, y0:y1, x0:x1] = feat_patch
        self._refresh(box)

    # ------------------------------------------------------------------ checks and helpers
    def _check_point(self, y: int, x: int) -> tuple[int, int]:
        if not (isinstance(y, (int, np.integer)) and isinstance(x, (int, np.integer))):
            raise InvalidArgumentError(f"coordinates must be integers, got ({y!r}, {x!r})")
        if not (0 <= y < self.height and 0 <= x < self.width):
            raise InvalidArgumentError(f"({y}, {x}) is outside the {self.height}x{self.width} scene")
        return int(y), int(x)

    def _check_label(self, label: int) -> int:
        if not isinstance(label, (int, np.integer)) or not 0 <= label < self.label_nc:
            raise InvalidArgumentError(f"label {label!r} is not a class id in 0..{self.label_nc - 1}")
        return int(label)

    def _check_labels(self, label: torch.Tensor) -> None:
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= self.label_nc):
            raise InvalidArgumentError(f"the label map holds ids outside 0..{self.label_nc - 1}: check the model's --label_nc")

    def _new_instance_id(self, label: int) -> int:
        """A fresh id: class*1000+k (k unused in the scene) for thing classes, the class id for stuff (and for every
        class without instance maps)."""
        if label not in THING_CLASSES or self.spec.no_instance:
            return label
        used = {int(v) for v in torch.unique(self.inst) if label * 1000 <= int(v) < (label + 1) * 1000}
        k = next((k for k in range(1000) if label * 1000 + k not in used), None)
        if k is None:  # (ids past class*1000+999 would read as another class)
            raise InvalidArgumentError(f"a class holds at most 1000 instances (ids {label * 1000} to {label * 1000 + 999}) "
                                       f"and class {label} has them all: remove or relabel one of its objects first")
        return label * 1000 + k

    def _instance_features(self, inst_id: int, style: int | None) -> torch.Tensor | None:
        """The feature vector (F,) for an instance: the chosen style, else the one its id already has
        in the scene (painting more of a stuff class), else one sampled from its class's clusters."""
        if not self.use_features:
            if style is not None:
                raise InvalidArgumentError("this model has no instance features, so no styles")
            return None
        if style is not None:
            options = class_styles(self.model.clusters, class_of(inst_id))
            if not isinstance(style, (int, np.integer)) or not 0 <= style < options.shape[0]:
                raise InvalidArgumentError(f"style {style!r} is not one of the {options.shape[0]} styles of class "
                                 f"{class_of(inst_id)}")
            return options[int(style)].to(self.device)
        existing = self.inst == inst_id
        if existing.any():
            return self.feat[:, existing][:, 0].clone()
        probe = torch.full((1, 1), inst_id, dtype=torch.int32, device=self.device)
        return self._sample_features(probe)[:, 0, 0]

    _box = staticmethod(mask_box)

    def _paint_mask(self, mask: torch.Tensor, label: int, inst_id: int, vector: torch.Tensor | None,
                    restyle: torch.Tensor | None = None) -> None:
        """``_paint_region`` over the box of ``mask`` (and of ``restyle``, pixels that only take ``vector``)."""
        box = self._box(mask if restyle is None else mask | restyle)
        if box is not None:
            y0, y1, x0, x1 = box
            self._paint_region(box, mask[y0:y1, x0:x1], label, inst_id, vector,
                               None if restyle is None else restyle[y0:y1, x0:x1])

    def _paint_region(self, box, inside: torch.Tensor, label: int, inst_id: int, vector: torch.Tensor | None,
                      restyle: torch.Tensor | None = None) -> None:
        """Give the pixels ``inside`` (a mask over ``box``) class ``label``, id ``inst_id`` and features ``vector``,
        and the pixels ``restyle`` (a mask over ``box``, or None) features ``vector`` only."""
        y0, y1, x0, x1 = box
        label_patch = torch.where(inside, label, self.label[y0:y1, x0:x1])
        inst_patch = torch.where(inside, inst_id, self.inst[y0:y1, x0:x1]).to(torch.int32)
        feat_patch = None
        if self.feat is not None:
            featured = inside if restyle is None else inside | restyle
            feat_patch = torch.where(featured[None], vector[:, None, None], self.feat[:, y0:y1, x0:x1])
        self._apply(box, label_patch, inst_patch, feat_patch)

    # ------------------------------------------------------------------ edits
    def instance_at(self, y: int, x: int) -> int:
        y, x = self._check_point(y, x)
        return int(self.inst[y, x])

    def change_label(self, y: int, x: int, label: int) -> None:
        """The instance under (y, x) becomes class ``label`` (a new id for thing classes; new features)."""
        y, x = self._check_point(y, x)
        label = self._check_label(label)
        old = int(self.inst[y, x])
        if class_of(old) == label and int(self.label[y, x]) == label:
            return
        new_id = self._new_instance_id(label)
        self._paint_mask(self.inst == old, label, new_id, self._instance_features(new_id, None))

    def paint(self, points: Sequence[Sequence[int]], label: int, width: int = 8) -> None:
        """Paint class ``label`` along the polyline ``points`` [(y, x), ...] with a round brush of ``width`` pixels.

        The work is proportional to the pixels the stroke touches; a stroke of more than
        ``MAX_STROKE_POINTS`` points, wider than ``MAX_BRUSH_WIDTH``, or costing more than
        ``MAX_STROKE_WORK`` pixel tests is refused.
        """
        label = self._check_label(label)
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= MAX_BRUSH_WIDTH:
            raise InvalidArgumentError(f"brush width must be an integer from 1 to {MAX_BRUSH_WIDTH}, got {width!r}")
        if len(points) > MAX_STROKE_POINTS:
            raise InvalidArgumentError(f"a stroke has at most {MAX_STROKE_POINTS} points, this one has {len(points)}; "
                             "paint it in several strokes")
        if len(points) == 0:  # (a numpy array has no truth value)
            raise InvalidArgumentError("a stroke needs at least one point")
        points = [self._check_point(*p) for p in points]
        box, inside = self._stroke_region(points, int(width))
        inst_id = self._new_instance_id(label)
        self._paint_region(box, inside, label, inst_id, self._instance_features(inst_id, None))

    def _stroke_region(self, points: list[tuple[int, int]], width: int) -> tuple[tuple[int, int, int, int], torch.Tensor]:
        """(box, mask over the box) of the pixels within width/2 of the polyline (``strokes.stroke_region``)."""
        box, inside = stroke_region(points, width, self.height, self.width)
        return box, inside.to(self.device)

    def add_object(self, mask, y: int, x: int, label: int, style: int | None = None) -> int:
        """Paste an object ``mask`` (h, w) with its top-left corner at (y, x) as a new instance of ``label``.

        Parts of the mask outside the scene are clipped. Returns the instance id of the pasted pixels.
        ``style`` picks the instance's style (None: sampled from the class's clusters). A stuff class has
        one instance, all of its pixels (its id is the class id): pasted pixels of a stuff class the scene
        already holds join that instance, which keeps one feature vector (pix2pixHD's features are per
        instance, and a save stores one vector per id), so a ``style`` restyles the whole instance, as
        ``set_style`` on it would; without one, the pasted pixels take the instance's vector.
        """
        y, x = self._check_point(y, x)
        label = self._check_label(label)
        mask = torch.as_tensor(np.asarray(mask)).to(self.device).bool()
        if mask.dim() != 2 or not mask.any():
            raise InvalidArgumentError(f"an object mask must be a non-empty (h, w) array, got shape {tuple(mask.shape)}")
        inst_id = self._new_instance_id(label)
        vector = self._instance_features(inst_id, style)
        full = torch.zeros(self.height, self.width, dtype=torch.bool, device=self.device)
        h, w = min(mask.shape[0], self.height - y), min(mask.shape[1], self.width - x)
        full[y:y + h, x:x + w] = mask[:h, :w]
        if not full.any():
            raise InvalidArgumentError(f"none of the object lies in the scene with its corner at ({y}, {x})")
        existing = self.inst == inst_id  # a stuff instance given a style takes it everywhere: one instance, one vector
        restyle = existing if (style is not None and existing.any()
                               and not torch.equal(self._instance_features(inst_id, None), vector)) else None
        self._paint_mask(full, label, inst_id, vector, restyle)
        return inst_id

    def remove_object(self, y: int, x: int) -> int:
        """Fill the object under (y, x) with the stuff class around it (the most common one in a ring
        of pixels around the object, widened until it holds stuff). Returns that class."""
        y, x = self._check_point(y, x)
        inst_id = int(self.inst[y, x])
        cls = class_of(inst_id)
        if cls not in THING_CLASSES:
            raise InvalidArgumentError(f"({y}, {x}) is not on an object but on a region of class {cls}; only objects (cars, "
                             "persons, ...) can be removed")
        mask = self.inst == inst_id
        stuff = surrounding_stuff(self.label, mask, self._box(mask), self.label_nc)
        self._paint_mask(mask, stuff, stuff, self._instance_features(stuff, None))
        return stuff

    def style_options(self, y: int, x: int) -> torch.Tensor:
        """The (k, feat_num) style centres of the class of the instance under (y, x)."""
        y, x = self._check_point(y, x)
        if not self.use_features:
            raise InvalidArgumentError("this model has no instance features, so no styles")
        return class_styles(self.model.clusters, class_of(int(self.inst[y, x])))

    def style_of(self, y: int, x: int) -> int | None:
        """Which style (cluster index) the instance under (y, x) has; None when its features are no cluster centre."""
        y, x = self._check_point(y, x)
        if not self.use_features:
            return None
        try:
            styles = class_styles(self.model.clusters, class_of(int(self.inst[y, x]))).to(self.device)
        except ValueError:
            return None
        matches = torch.nonzero((styles == self.feat[:, y, x][None]).all(dim=1))
        return int(matches[0]) if matches.numel() else None

    def set_style(self, y: int, x: int, cluster: int) -> None:
        """Give the instance under (y, x) the style (cluster centre) ``cluster`` of its class."""
        y, x = self._check_point(y, x)
        inst_id = int(self.inst[y, x])
        vector = self._instance_features(inst_id, cluster)
        self._paint_mask(self.inst == inst_id, int(self.label[y, x]), inst_id, vector)

    def style_previews(self, y: int, x: int, margin: int = 16) -> list[np.ndarray]:
        """The instance under (y, x), cropped with ``margin`` pixels around it, rendered in every style of its class.

        All styles go through the generator in one batch, on a crop of the input around the
        instance (with as much context again on every side, whole multiples of what the
        generator needs), not on the whole scene: a preview costs the crop's pixels. The
        context differs from the full scene's, so a preview is close to, not equal to, the
        image the style gives once applied.
        """
        styles = self.style_options(y, x)
        inst_id = int(self.inst[y, x])
        return preview_images(self.model, self.input, self.inst, inst_id, self._box(self.inst == inst_id), styles,
                              margin)

    # ------------------------------------------------------------------ history
    def undo(self) -> bool:
        """Revert the last edit; False when there is nothing to undo."""
        change = self.edits.undo()
        if change is None:
            return False
        self._write(change.box, change.before)
        return True

    def redo(self) -> bool:
        change = self.edits.redo()
        if change is None:
            return False
        self._write(change.box, change.after)
        return True

    def reset(self) -> bool:
        """Back to the scene as it was loaded, as one edit that ``undo`` reverts; False when nothing differed."""
        label, inst, feat = self._initial
        box = self._box(differing((self.label, self.inst, self.feat), self._initial, (0, self.height, 0, self.width)))
        if box is None:
            return False
        y0, y1, x0, x1 = box
        self._apply(box, label[y0:y1, x0:x1].clone(), inst[y0:y1, x0:x1].clone(),
                    None if feat is None else feat[:, y0:y1, x0:x1].clone())
        return True

    # ------------------------------------------------------------------ outputs
    def regenerate(self) -> tuple[int, int, int, int] | None:
        """Regenerate the image after edits (``regeneration.regenerate``: only as far as they reach where the
        generator is local); returns the box (y0, y1, x0, x1) of the image rewritten, None when it was up to date."""
        if self._changed is None:
            return None
        self._image, rewritten = regenerate(self.model, self.input, self._image, self._changed, self._radius)
        self._changed = None
        return rewritten

    @property
    def changed_box(self) -> tuple[int, int, int, int] | None:
        """The box (y0, y1, x0, x1) of the generator's input, label map and outlines changed since the image was
        last regenerated; None when it is up to date."""
        return self._changed

    def image(self, box=None) -> np.ndarray:
        """The generated image (H, W, 3) uint8, or its part in ``box`` (y0, y1, x0, x1), regenerated first if edited."""
        self.regenerate()
        y0, y1, x0, x1 = box or (0, self.height, 0, self.width)
        return tensor_to_image(self._image[:, y0:y1, x0:x1])

    def label_image(self, box=None) -> np.ndarray:
        """The label map in the dataset's colours (H, W, 3) uint8, or its part in ``box``: a picture, not ids."""
        y0, y1, x0, x1 = box or (0, self.height, 0, self.width)
        return colorize_labels(self.label[y0:y1, x0:x1].cpu().numpy(), self.label_nc)

    def instance_outlines(self, box=None) -> np.ndarray:
        """(H, W, 4) uint8, or its part in ``box``: opaque on the instances' edges (``styles.outlines``)."""
        return outlines(self.inst, box or (0, self.height, 0, self.width))

    def save(self, folder: str | os.PathLike, name: str = "scene", phase: str = "test") -> Path:
        """Write the scene as a dataset that ``fastp2phd test --dataroot folder`` reads; returns the folder.

        ``<phase>_label/<name>.png`` (class ids), ``<phase>_inst/<name>.png`` (16-bit
        instance ids), ``<phase>_img/<name>.png`` (the generated image) and, with instance
        features, ``<phase>_features/<name>.npz`` (each instance's feature vector, which
        ``fastp2phd test`` uses instead of sampling the clusters). ``name`` may hold subfolders
        (``a/s``), as a dataset's scene names do. The files are saved as one unit: killed or out
        of disk space midway, the folder holds the scene's previous save or this one, never a mix.
        Several scenes can share a folder; saving a scene again replaces its files.
        """
        save_scene(folder, name, phase, self.label, self.inst, self.feat, self.image)
        self.edits.mark_saved((self.label, self.inst, self.feat))
        return Path(folder)

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Copies of (label, inst, feat) as numpy arrays."""
        return (self.label.cpu().numpy().copy(), self.inst.cpu().numpy().copy(),
                None if self.feat is None else self.feat.cpu().numpy().copy())

    def objects(self) -> Iterable[tuple[int, np.ndarray]]:
        """(instance id, mask cropped to its box) of every thing instance in the scene."""
        return thing_objects(self.inst)
