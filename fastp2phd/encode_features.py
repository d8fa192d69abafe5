"""``fastp2phd encode-features``: encode the training set's instances and cluster them per class.

As the original: every training image is encoded by the trained encoder E, one
feature vector per instance is kept with its relative area, and K-means runs per
class on the instances above the area threshold. Unlike the original, images are
encoded in batches on the model's device, K-means runs there too, and clusters are
stored as ``.npz`` (no pickle).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .console import progress_bar
from .features import ClustersFileError, FeatureCollector, cluster_features, clusters_writer, load_clusters
from .files import remove_leftover_temporaries, save_file_set
from .inference import InferenceError
from .pix2pixhd import Pix2PixHD
from .specs import DataSpec


def encode_features(model: Pix2PixHD, data: DataSpec, folder: str | os.PathLike, *, batch_size: int = 1,
                    num_workers: int = 0, seed: int = 0, progress: bool = True, area_threshold: float = 0.5) -> Path:
    """Encode the photos of ``data`` (unflipped) with ``model``'s encoder, cluster them, and write
    ``folder/features_clustered_<n_clusters>.npz`` (and the raw ``features.npz``); returns the clusters file.
    Instances whose relative area (pixels / (H * W // 32)) is not above ``area_threshold`` (0.5 as in the
    original) are left out of the clusters: lower it for small images, where people and poles are small."""
    from .data import DatasetError, create_dataset
    from .training import collate

    spec = model.spec
    if not spec.uses_features:
        raise InferenceError("encode-features needs a model trained with --instance_feat (or --label_feat): pass the "
                             "same flag")
    if model.netE is None:
        raise InferenceError("encode-features needs the run's encoder (<which_epoch>_net_E.pth), which is not there")
    folder = Path(folder)
    path = folder / f"features_clustered_{spec.n_clusters:03d}.npz"
    for name, kind in (("features.npz", "features"), (path.name, "clusters")):  # before the encoding's minutes
        _check_replaceable(folder / name, kind)
    device = next(model.parameters()).device
    try:
        dataset = create_dataset(data.replace(read_images=True, train=False))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
        collector = FeatureCollector()
        bar = progress_bar(len(dataset), "encoding", progress)
        with torch.no_grad():
            for batch in loader:
                image, inst, label = (batch[k].to(device) for k in ("image", "inst", "label"))
                model.check_size(label, batch["path"][0])  # one size per batch: the first scene names it
                regions = label if spec.label_feat else inst
                collector.add(model.encode_features(image, inst, label), regions)
                bar.update(image.shape[0])
        bar.close()
    except DatasetError as exc:
        raise InferenceError(str(exc)) from None
    features = collector.result()
    # Only the leftovers of these two files: a `train` may be writing checkpoints into this folder now.
    remove_leftover_temporaries(folder, ["features.npz", path.name])
    centers = cluster_features(features, n_clusters=spec.n_clusters, area_threshold=area_threshold, seed=seed,
                               device=device)
    with save_file_set(folder, "features and clusters") as files:  # the clusters always match the features beside them
        files.write("features.npz", clusters_writer(features, {"kind": "features",
                                                               "columns": "features..., relative area"}))
        files.write(path.name, clusters_writer(centers, {"kind": "clusters", "feat_num": spec.feat_num,
                                                         "n_clusters": spec.n_clusters}))
    return path


def _check_replaceable(path: Path, kind: str) -> None:
    """Refuse to replace clusters encode-features did not write: a user's, saved there with ``save_clusters``
    (converted from the original's .npy, or edited), which no rerun gives back. An unreadable file is replaced."""
    if not path.is_file():
        return
    try:
        meta = load_clusters(path)[1]
    except (ClustersFileError, OSError):
        return
    if meta.get("kind") != kind:
        raise InferenceError(f"{path} holds {kind} that encode-features did not write (saved with save_clusters), "
                             "so it does not replace them; move the file away (test and edit read it with "
                             "--cluster_path) or remove it, and run encode-features again")
