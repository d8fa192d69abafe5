"""``fastp2phd encode-features``: encode the training set's instances and cluster them per class.

As the original: every training image is encoded by the trained encoder E, one
feature vector per instance is kept with its relative area, and K-means runs per
class on the instances above the area threshold. Unlike the original, images are
encoded in batches on the model's device, K-means runs there too, and clusters are
stored as ``.npz`` (no pickle).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .console import progress_bar
from .features import FeatureCollector, cluster_features, save_clusters
from .inference import InferenceError, load_network_file
from .pix2pixhd import Pix2PixHD, uses_features


def encode_features(opt: argparse.Namespace, device: torch.device) -> Path:
    """Write ``features_clustered_<n_clusters>.npz`` (and the raw ``features.npz``); returns the clusters file."""
    from .data import DatasetError, create_dataset
    from .training import collate

    if not uses_features(opt):
        raise InferenceError("encode-features needs a model trained with --instance_feat (or --label_feat): pass the same flag")
    encode_opt = argparse.Namespace(**{**vars(opt), "isTrain": True, "no_flip": True, "serial_batches": True})
    model = Pix2PixHD(encode_opt)
    folder = Path(opt.checkpoints_dir) / opt.name
    load_network_file(model.netE, folder / f"{opt.which_epoch}_net_E.pth")
    model = model.to(device).eval()
    try:
        dataset = create_dataset(encode_opt)
        loader = DataLoader(dataset, batch_size=opt.batchSize, shuffle=False, num_workers=opt.nThreads, collate_fn=collate)
        collector = FeatureCollector()
        progress = progress_bar(len(dataset), "encoding", not opt.no_progress)
        with torch.no_grad():
            for batch in loader:
                image, inst, label = (batch[k].to(device) for k in ("image", "inst", "label"))
                regions = label if opt.label_feat else inst
                collector.add(model.encode_features(image, inst, label), regions)
                progress.update(image.shape[0])
        progress.close()
    except DatasetError as exc:
        raise InferenceError(str(exc)) from None
    features = collector.result()
    save_clusters(folder / "features.npz", features, {"kind": "features", "columns": "features..., relative area"})
    centers = cluster_features(features, n_clusters=opt.n_clusters, seed=opt.seed, device=device)
    path = folder / f"features_clustered_{opt.n_clusters:03d}.npz"
    save_clusters(path, centers, {"kind": "clusters", "feat_num": opt.feat_num, "n_clusters": opt.n_clusters})
    return path
