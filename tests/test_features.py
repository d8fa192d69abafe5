"""fastp2phd.features: instance features, k-means, per-class clustering, storage, sampling."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from fastp2phd.features import (
    ClustersFileError,
    FeatureCollector,
    UnsafePickleError,
    class_features,
    cluster_features,
    import_official_clusters,
    instance_features,
    kmeans,
    load_clusters,
    sample_feature_map,
    save_clusters,
)

# --------------------------------------------------------------------------------------------
# instance_features / class_features / FeatureCollector
# --------------------------------------------------------------------------------------------


def test_instance_features_middle_pixel_and_area():
    # 8 x 8 plane -> relative area = num / (64 // 32) = num / 2.
    inst = torch.zeros(1, 1, 8, 8, dtype=torch.int64)
    inst[0, 0, 1, 2:5] = 26001  # 3 pixels, row 1
    inst[0, 0, 2, 0:2] = 26001  # 2 pixels, row 2 -> 5 pixels, middle is the 3rd: (1, 4)
    inst[0, 0, 5:7, 5:7] = 7    # 4 pixels -> middle is the 3rd in row-major order: (6, 5)
    # Features differ at every pixel: feature c at (y, x) = 100 * c + 8 * y + x.
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    feat = torch.stack([8 * ys + xs + 100 * c for c in range(3)]).unsqueeze(0)
    (item,) = instance_features(feat, inst)
    assert sorted(item) == [0, 7, 26001]
    f, area = item[26001]
    assert torch.equal(f, torch.tensor([12.0, 112.0, 212.0]))  # pixel (1, 4)
    assert area == 5 / 2
    f, area = item[7]
    assert torch.equal(f, torch.tensor([53.0, 153.0, 253.0]))  # pixel (6, 5)
    assert area == 2.0
    f, area = item[0]
    num0 = 64 - 9
    # Background: pixel num0 // 2 = 27 of its row-major list; rows 0 (8 px), 1 (5 px), 2 (6 px),
    # 3 (8 px) -> 27 lands on row 4, column 0.
    assert area == num0 / 2
    assert torch.equal(f, torch.tensor([32.0, 132, 232]))
    assert f.device.type == "cpu" and f.dtype == feat.dtype


def test_instance_features_matches_loop_on_random_maps_and_keeps_items_apart():
    g = torch.Generator().manual_seed(3)
    inst = torch.randint(0, 4, (3, 1, 9, 13), generator=g) * 1000 + torch.randint(0, 3, (3, 1, 9, 13), generator=g)
    inst[1] = 42  # one item with a single id appearing nowhere else
    feat = torch.randn(3, 2, 9, 13, generator=g, dtype=torch.float64)
    out = instance_features(feat, inst)
    assert len(out) == 3
    for b in range(3):
        flat = inst[b, 0].reshape(-1)
        assert sorted(out[b]) == sorted(set(flat.tolist()))
        for i, (f, area) in out[b].items():
            where = (flat == i).nonzero().squeeze(1)
            mid = int(where[len(where) // 2])
            assert torch.equal(f, feat[b, :, mid // 13, mid % 13])
            assert area == len(where) / (9 * 13 // 32)
    assert list(out[1]) == [42]


def test_instance_features_accepts_integral_float_ids_and_rejects_bad_input():
    inst = torch.tensor([[[[3.0, 3.0], [5.0, 5.0]]]])
    feat = torch.arange(4.0).reshape(1, 1, 2, 2)
    (item,) = instance_features(feat, inst)
    assert item[3][0].item() == 1.0 and item[5][0].item() == 3.0  # middle = 2nd pixel of 2
    assert item[3][1] == 2.0  # 2 / max(4 // 32, 1)
    with pytest.raises(ValueError, match="non-integral"):
        instance_features(feat, inst + 0.5)
    with pytest.raises(ValueError, match="does not match"):
        instance_features(torch.zeros(1, 1, 2, 3), inst)


def test_class_features_groups_by_class():
    inst = torch.zeros(2, 1, 8, 8, dtype=torch.int32)
    inst[0, 0, :4] = 26001
    inst[0, 0, 4:] = 26002
    inst[1, 0, :, :2] = 26  # a class id below 1000 is its own class
    inst[1, 0, :, 2:] = 7
    feat = torch.zeros(2, 2, 8, 8)
    feat[0, :, :4] = 1.0
    feat[0, :, 4:] = 2.0
    feat[1, :, :, :2] = 3.0
    feat[1, :, :, 2:] = 4.0
    per_item = instance_features(feat, inst)
    grouped = class_features(per_item)
    assert list(grouped) == [7, 26]
    assert torch.equal(grouped[7], torch.tensor([[4.0, 4.0, 24.0]]))
    assert torch.equal(grouped[26], torch.tensor([[1.0, 1.0, 16.0], [2.0, 2.0, 16.0], [3.0, 3.0, 8.0]]))

    collector = FeatureCollector()
    collector.add(feat[:1], inst[:1])
    collector.add(feat[1:], inst[1:])
    assert collector.num_items == 2
    result = collector.result()
    assert list(result) == [7, 26]
    for cls in result:
        assert torch.equal(result[cls], grouped[cls])


# --------------------------------------------------------------------------------------------
# kmeans
# --------------------------------------------------------------------------------------------

BLOB_CENTRES = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
BLOB_STD = 0.2


def blobs(per_blob=60, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = BLOB_CENTRES.repeat_interleave(per_blob, 0) + BLOB_STD * torch.randn(4 * per_blob, 3, generator=g)
    truth = torch.arange(4).repeat_interleave(per_blob)
    return x.to(dtype), truth


def inertia_numpy(x, centers, labels):
    x, c, lab = x.double().numpy(), centers.double().numpy(), labels.numpy()
    return float(((x - c[lab]) ** 2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_recovers_blobs(dtype):
    x, truth = blobs(dtype=dtype)
    centers, labels, inertia = kmeans(x, 4, seed=1)
    assert centers.shape == (4, 3) and centers.dtype == dtype
    assert labels.shape == (240,) and labels.dtype == torch.int64
    # Match centres up to permutation; the mean of 60 points is within a few std/sqrt(60).
    tol = 5 * BLOB_STD / 60 ** 0.5
    best = min(itertools.permutations(range(4)),
               key=lambda p: float((centers[list(p)].double() - BLOB_CENTRES.double()).abs().max()))
    assert float((centers[list(best)].double() - BLOB_CENTRES.double()).abs().max()) < tol
    # The partition is the true one (blobs are 25 std apart).
    relabel = torch.empty(4, dtype=torch.int64)
    relabel[torch.tensor(best)] = torch.arange(4)
    assert torch.equal(relabel[labels], truth)
    # Inertia is that of the returned assignment, and the assignment is nearest-centre.
    assert inertia == pytest.approx(inertia_numpy(x, centers, labels), rel=1e-5 if dtype == torch.float32 else 1e-12)
    d = ((x.double()[:, None] - centers.double()[None]) ** 2).sum(-1)
    assert torch.equal(d.argmin(1), labels)
    # The lowest-inertia fit is about n * d * std^2.
    assert inertia < 1.5 * 240 * 3 * BLOB_STD ** 2


def test_kmeans_k_larger_than_n_clamps():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    centers, labels, inertia = kmeans(x, 10)
    assert centers.shape == (3, 2)
    assert sorted(map(tuple, centers.tolist())) == sorted(map(tuple, x.tolist()))
    assert sorted(labels.tolist()) == [0, 1, 2]
    assert inertia == 0.0


def test_kmeans_deterministic_per_seed():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 4, generator=g)  # no structure: the result depends on the seed
    a = kmeans(x, 6, seed=11, n_init=2)
    b = kmeans(x, 6, seed=11, n_init=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    others = [kmeans(x, 6, seed=s, n_init=1) for s in range(4)]
    assert len({tuple(o[0].flatten().tolist()) for o in others}) > 1


def test_kmeans_more_restarts_never_worse():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    one = kmeans(x, 5, seed=0, n_init=1)[2]
    ten = kmeans(x, 5, seed=0, n_init=10)[2]  # the first restart is the same as n_init=1
    assert ten <= one


def test_kmeans_empty_cluster_from_adversarial_start_is_reseeded():
    x, _ = blobs(per_blob=20)
    # Centre 3 is far from every point: it gets no point in the first assignment.
    init = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1e4, 1e4, 1e4]])
    centers, labels, inertia = kmeans(x, 4, init=init)
    assert centers.shape == (4, 3) and torch.isfinite(centers).all()
    assert float(centers.abs().max()) < 10  # the far centre moved onto the data
    assert inertia == pytest.approx(inertia_numpy(x, centers, labels), rel=1e-5)
    # Re-seeding to the farthest point lets the run find the fourth blob.
    assert len(set(labels.tolist())) == 4
    assert inertia < 1.5 * 80 * 3 * BLOB_STD ** 2


def test_kmeans_duplicate_points_give_empty_clusters_without_nan():
    # 10 points but only 3 distinct values and k = 5: two centres must duplicate others.
    x = torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 1.0]] * 3 + [[3.0, -1.0]] * 3, dtype=torch.float64)
    centers, labels, inertia = kmeans(x, 5)
    assert centers.shape == (5, 2) and torch.isfinite(centers).all()
    assert inertia == 0.0
    distinct = {(0.0, 0.0), (1.0, 1.0), (3.0, -1.0)}
    assert set(map(tuple, centers.tolist())) == distinct


def test_kmeans_rejects_bad_input():
    with pytest.raises(TypeError, match="float32 or float64"):
        kmeans(torch.zeros(3, 2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="at least one point"):
        kmeans(torch.zeros(0, 2), 2)
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans(torch.zeros(3, 2), 0)


# --------------------------------------------------------------------------------------------
# cluster_features
# --------------------------------------------------------------------------------------------


def test_cluster_features_area_filter_and_k_reduction():
    features = {
        26: torch.tensor([[1.0, 0.0, 0.1],     # too small
                          [2.0, 0.0, 0.6],
                          [3.0, 0.0, 0.9],
                          [4.0, 0.0, 2.0],
                          [9.0, 9.0, 0.5]]),   # area exactly 0.5 is dropped (strictly greater)
        7: torch.tensor([[1.0, 1.0, 0.2], [2.0, 2.0, 0.4]]),  # nothing left -> omitted
        24: torch.tensor([[float(i), 0.0, 1.0] for i in range(30)]),
    }
    out = cluster_features(features, n_clusters=10)
    assert list(out) == [24, 26]
    assert out[26].shape == (3, 2)  # k reduced to the 3 kept instances
    assert sorted(map(tuple, out[26].tolist())) == [(2.0, 0.0), (3.0, 0.0), (4.0, 0.0)]
    assert out[24].shape == (10, 2)
    # Each centre is the mean of a contiguous run of the 30 points on a line.
    assert torch.all(out[24][:, 1] == 0) and out[24][:, 0].min() >= 0 and out[24][:, 0].max() <= 29
    assert cluster_features(features, n_clusters=10, area_threshold=0.7)[26].shape == (2, 2)


# --------------------------------------------------------------------------------------------
# save_clusters / load_clusters
# --------------------------------------------------------------------------------------------


def sample_centres():
    g = torch.Generator().manual_seed(0)
    return {26: torch.randn(10, 3, generator=g), 7: torch.randn(2, 3, generator=g), 1234: torch.randn(1, 3, generator=g)}


def test_save_load_round_trip_exact(tmp_path):
    centres = sample_centres()
    centres[7] = centres[7].double()
    path = tmp_path / "clusters.npz"
    save_clusters(path, centres, meta={"dataset": "cityscapes", "n_clusters": 10})
    loaded, meta = load_clusters(path)
    assert list(loaded) == [7, 26, 1234]
    for cls, c in centres.items():
        assert loaded[cls].dtype == c.dtype and torch.equal(loaded[cls], c)
    assert meta["feat_num"] == 3 and meta["n_clusters"] == 10 and meta["dataset"] == "cityscapes"
    assert meta["format"] == "fastp2phd-clusters" and meta["classes"] == [7, 26, 1234]
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["__meta__", "class_007", "class_026", "class_1234"]
    assert os.listdir(tmp_path) == ["clusters.npz"]  # no temporary file left behind


def test_interrupted_save_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "clusters.npz"
    save_clusters(path, sample_centres())
    before = path.read_bytes()

    def crashing_savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half an archive")
        raise RuntimeError("simulated crash during write")

    monkeypatch.setattr(np, "savez", crashing_savez)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_clusters(path, {1: torch.zeros(1, 3)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["clusters.npz"]
    monkeypatch.undo()
    loaded, _ = load_clusters(path)
    assert list(loaded) == [7, 26, 1234]


def test_load_refuses_missing_foreign_corrupt_and_pickled(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clusters(tmp_path / "nope.npz")

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros((2, 2)))
    with pytest.raises(ClustersFileError, match="not a fastp2phd clusters file"):
        load_clusters(foreign)

    good = tmp_path / "good.npz"
    save_clusters(good, sample_centres())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ClustersFileError, match="corrupt"):
        load_clusters(truncated)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not an archive at all")
    with pytest.raises(ClustersFileError, match="not a fastp2phd clusters file"):
        load_clusters(garbage)

    # A valid-looking archive whose class entry is a pickled object array.
    with np.load(good, allow_pickle=False) as npz:
        meta = npz["__meta__"]
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, __meta__=meta, class_026=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ClustersFileError, match="pickled object array"):
        load_clusters(pickled)

    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros((2, 3)))
    with pytest.raises(ClustersFileError, match="import_official_clusters"):
        load_clusters(npy)


def test_load_uses_allow_pickle_false(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_clusters(path, sample_centres())
    seen = []
    real_load = np.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("allow_pickle"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    load_clusters(path)
    assert seen == [False]


def test_save_rejects_bad_centres(tmp_path):
    with pytest.raises(ClustersFileError, match="inconsistent widths"):
        save_clusters(tmp_path / "x.npz", {1: torch.zeros(2, 3), 2: torch.zeros(2, 4)})
    with pytest.raises(ClustersFileError, match="2-D"):
        save_clusters(tmp_path / "x.npz", {1: torch.zeros(3)})
    with pytest.raises(ClustersFileError, match="reserved"):
        save_clusters(tmp_path / "x.npz", {1: torch.zeros(2, 3)}, meta={"format": "mine"})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# import_official_clusters
# --------------------------------------------------------------------------------------------


def test_import_official_clusters(tmp_path):
    official = {np.int64(26): np.random.default_rng(0).normal(size=(10, 3)),
                7: np.ones((2, 3), dtype=np.float32)}
    path = tmp_path / "features_clustered_010.npy"
    np.save(path, official)
    with pytest.raises(UnsafePickleError, match="allow_pickle") as info:
        import_official_clusters(path)
    assert "--allow_pickle" in str(info.value) and "save_clusters" in str(info.value)

    loaded = import_official_clusters(path, allow_pickle=True)
    assert list(loaded) == [7, 26]
    assert torch.equal(loaded[26], torch.from_numpy(official[np.int64(26)]))
    assert loaded[7].dtype == torch.float32 and torch.equal(loaded[7], torch.ones(2, 3))

    # Convert once, then read pickle-free.
    save_clusters(tmp_path / "clusters.npz", loaded)
    again, meta = load_clusters(tmp_path / "clusters.npz")
    assert meta["feat_num"] == 3 and all(torch.equal(again[c], loaded[c]) for c in loaded)


def test_import_official_clusters_rejects_bad_content(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, {26: np.zeros((10, 3)), 7: np.zeros((2, 4))})
    with pytest.raises(ClustersFileError, match="inconsistent widths"):
        import_official_clusters(bad, allow_pickle=True)
    not_dict = tmp_path / "array.npy"
    np.save(not_dict, np.zeros((3, 3)))
    with pytest.raises(ClustersFileError, match="dict"):
        import_official_clusters(not_dict, allow_pickle=True)
    with pytest.raises(FileNotFoundError):
        import_official_clusters(tmp_path / "missing.npy", allow_pickle=True)


# --------------------------------------------------------------------------------------------
# sample_feature_map
# --------------------------------------------------------------------------------------------


def sampling_setup():
    inst = torch.zeros(2, 1, 6, 8, dtype=torch.int64)  # background 0: class 0, no centres
    inst[0, 0, :3, :4] = 26001
    inst[0, 0, :3, 4:] = 26002
    inst[0, 0, 3:, :4] = 7      # class 7: no centres
    inst[0, 0, 3:, 4:] = 24000
    inst[1, 0, :, :3] = 26001   # same id in another item: drawn independently
    inst[1, 0, :, 3:6] = 26
    g = torch.Generator().manual_seed(0)
    centres = {26: torch.randn(4, 3, generator=g), 24: torch.randn(2, 3, generator=g).double()}
    return inst, centres


def test_sample_feature_map_uses_class_centres_and_zeros_elsewhere():
    inst, centres = sampling_setup()
    out = sample_feature_map(inst, centres, 3, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 3, 6, 8) and out.dtype == torch.float32
    for b in range(2):
        for i in torch.unique(inst[b]).tolist():
            mask = inst[b, 0] == i
            pixels = out[b][:, mask].t()  # (num, 3)
            cls = i if i < 1000 else i // 1000
            if cls in centres:
                assert torch.all(pixels == pixels[0])  # constant over the instance
                cands = centres[cls].float()
                assert any(torch.equal(pixels[0], c) for c in cands)
            else:
                assert torch.all(pixels == 0)


def test_sample_feature_map_reproducible_and_random():
    inst, centres = sampling_setup()
    a = sample_feature_map(inst, centres, 3, generator=torch.Generator().manual_seed(7))
    b = sample_feature_map(inst, centres, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    maps = {sample_feature_map(inst, centres, 3, generator=torch.Generator().manual_seed(s))[0, :, 0, 0]
            .numpy().tobytes() for s in range(20)}
    assert len(maps) > 1  # 26001 in item 0 does not always get the same centre


def test_sample_feature_map_choices():
    inst, centres = sampling_setup()
    c26 = centres[26]
    out = sample_feature_map(inst, centres, 3, choices={26: 1}, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        mask = (inst[b, 0] >= 26000) & (inst[b, 0] < 27000) | (inst[b, 0] == 26)
        assert torch.all(out[b][:, mask] == c26[1][:, None])
    # An instance id wins over its class; other instances of the class keep the class choice.
    out = sample_feature_map(inst, centres, 3, choices={26: 1, 26002: 3, 24000: 0},
                             generator=torch.Generator().manual_seed(0))
    assert torch.all(out[0][:, inst[0, 0] == 26002] == c26[3][:, None])
    assert torch.all(out[0][:, inst[0, 0] == 26001] == c26[1][:, None])
    assert torch.all(out[0][:, inst[0, 0] == 24000] == centres[24][0].float()[:, None])
    # Fixing one instance does not change the draws of the others.
    free = sample_feature_map(inst, centres, 3, generator=torch.Generator().manual_seed(3))
    fixed = sample_feature_map(inst, centres, 3, choices={26002: 2}, generator=torch.Generator().manual_seed(3))
    others = inst[0, 0] != 26002
    assert torch.equal(free[0][:, others], fixed[0][:, others]) and torch.equal(free[1], fixed[1])


def test_sample_feature_map_rejects_bad_choices_and_widths():
    inst, centres = sampling_setup()
    with pytest.raises(ValueError, match="out of range"):
        sample_feature_map(inst, centres, 3, choices={26: 4})
    with pytest.raises(ValueError, match="out of range"):
        sample_feature_map(inst, centres, 3, choices={26001: -1})
    with pytest.raises(ValueError, match="no cluster centres"):
        sample_feature_map(inst, centres, 3, choices={7: 0})
    with pytest.raises(ValueError, match=r"expected \(k, 5\)"):
        sample_feature_map(inst, centres, 5)


def test_end_to_end_collect_cluster_save_sample(tmp_path):
    # Two kinds of cars with distinct (pooled) features; clustering recovers both.
    inst = torch.zeros(4, 1, 16, 16, dtype=torch.int64)
    feat = torch.zeros(4, 2, 16, 16)
    for b in range(4):
        inst[b, 0, :8, :8] = 26001
        inst[b, 0, 8:, 8:] = 26002
        feat[b, :, :8, :8] = torch.tensor([1.0, 0.0])[:, None, None] + 0.01 * b
        feat[b, :, 8:, 8:] = torch.tensor([0.0, 1.0])[:, None, None] - 0.01 * b
    collector = FeatureCollector()
    collector.add(feat[:2], inst[:2])
    collector.add(feat[2:], inst[2:])
    centres = cluster_features(collector.result(), n_clusters=2)
    assert list(centres) == [0, 26]  # background 0 has area 128 / 8 > 0.5
    got = centres[26][centres[26][:, 0].argsort()]
    assert torch.allclose(got, torch.tensor([[-0.015, 0.985], [1.015, 0.015]]), atol=1e-6)
    save_clusters(tmp_path / "c.npz", centres, meta={"n_clusters": 2})
    loaded, meta = load_clusters(tmp_path / "c.npz")
    out = sample_feature_map(inst[:1], loaded, meta["feat_num"], choices={26001: 0, 26002: 1})
    assert torch.equal(out[0, :, 0, 0], loaded[26][0]) and torch.equal(out[0, :, 15, 15], loaded[26][1])
