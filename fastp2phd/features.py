"""Instance-level feature embedding: encode, cluster, store and sample (pix2pixHD section 3.4).

pix2pixHD can condition its generator on a low-dimensional feature map produced by an
Encoder whose output is averaged per instance, so every pixel of an instance holds the
instance's feature vector. After training, this module provides the rest of the pipeline:

1. **Encode the training set.** :func:`instance_features` takes the (instance-pooled)
   encoder output and the instance map of a batch and keeps, per instance, ONE feature
   vector -- the value at the instance's *middle pixel* (position ``num // 2`` of the
   instance's pixels in row-major order, ``num`` being its pixel count) -- and its relative
   area ``num / (H * W // 32)``. :func:`class_features` / :class:`FeatureCollector` group
   these by semantic class (``id if id < 1000 else id // 1000``, the Cityscapes convention)
   as rows ``[feature..., area]``.
2. **Cluster.** :func:`cluster_features` keeps instances whose relative area is strictly
   greater than ``area_threshold`` (0.5) and runs :func:`kmeans` per class with
   ``min(n_clusters, number of instances)`` clusters.
3. **Store.** :func:`save_clusters` / :func:`load_clusters` use a pickle-free ``.npz``
   (``class_026``-style arrays plus a JSON ``__meta__`` string), written atomically.
   :func:`import_official_clusters` reads the original ``features_clustered_010.npy``
   (a pickled dict), only when explicitly allowed. They live in ``fastp2phd.clusters_file``.
4. **Sample at test time.** :func:`sample_feature_map` gives every instance whose class has
   centres one centre (drawn uniformly, or chosen), broadcast over its pixels; other pixels
   are 0.
5. **One edited scene.** :func:`instance_vectors` / :func:`save_instance_vectors` store a
   scene's per-instance vectors (the editor's Save); :func:`load_instance_vectors` and
   :func:`feature_map_from_vectors` rebuild its feature map at test time.

Everything runs in torch on the input tensors' device; only numpy is used for file I/O.

This module is the pipeline's one entry point; each step lives in a module of its own:
``feature_encoding`` (1), ``clustering`` (2), ``clusters_file`` (3), ``feature_maps`` (4, 5).
"""
from __future__ import annotations

from .clustering import cluster_features, kmeans
from .clusters_file import (ClustersFileError, UnsafePickleError, clusters_writer, import_official_clusters,
                            load_clusters, save_clusters)
from .feature_encoding import AREA_BLOCKS, FeatureCollector, class_features, class_of, instance_features
from .feature_maps import (feature_map_from_vectors, instance_vectors, load_instance_vectors, sample_feature_map,
                           save_instance_vectors, write_instance_vectors)

__all__ = [
    "AREA_BLOCKS",
    "ClustersFileError",
    "FeatureCollector",
    "UnsafePickleError",
    "class_features",
    "class_of",
    "cluster_features",
    "clusters_writer",
    "feature_map_from_vectors",
    "import_official_clusters",
    "instance_features",
    "instance_vectors",
    "kmeans",
    "load_clusters",
    "load_instance_vectors",
    "sample_feature_map",
    "save_clusters",
    "save_instance_vectors",
    "write_instance_vectors",
]
