"""``make demo`` / ``fastp2phd demo``: the whole pix2pixHD workflow on built-in synthetic scenes.

Writes a small Cityscapes-style dataset, trains a small pix2pixHD with instance
features within a time budget, encodes and clusters the instance features,
generates held-out scenes, renders one scene in every style of one car, and
writes everything to a web page. It ends by printing the page's path and the mean
L1 distance to the ground truth of the trained generator and of an untrained one.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from .specs import DataSpec, ModelSpec, TrainSpec
from .visualize import HTMLPage, label_to_image, tensor_to_image

SCENE = (64, 128)  # height, width of the demo scenes: small enough to train on 2 CPU cores
NUM_TRAIN, NUM_TEST = 96, 8

# A small pix2pixHD with instance features.
DEMO_MODEL = ModelSpec(label_nc=35, instance_feat=True, feat_num=3, nef=8, n_downsample_E=3, n_clusters=6,
                       ngf=16, n_downsample_global=3, n_blocks_global=3)


def demo_data(out: Path, phase: str, seed: int, *, train: bool = False, read_images: bool = True) -> DataSpec:
    return DataSpec.for_model(DEMO_MODEL, dataroot=str(out.resolve() / "data"), phase=phase, resize_or_crop="none",
                              train=train, read_images=read_images, seed=seed)


def demo_training(out: Path, seed: int, niter: int, niter_decay: int, *, continue_train: bool = False) -> TrainSpec:
    """What `fastp2phd train ...` would run for the demo."""
    return TrainSpec(
        model=DEMO_MODEL, data=demo_data(out, "train", seed, train=True), name="demo",
        checkpoints_dir=str(out / "checkpoints"), continue_train=continue_train, ndf=16, num_D=2, n_layers_D=2,
        no_vgg_loss=True, lr=0.0008, niter=niter, niter_decay=niter_decay, nThreads=0, seed=seed, batchSize=4,
        no_progress=True, print_freq=192, display_freq=384, save_latest_freq=100000, save_epoch_freq=1000,
    )


def _l1(model, dataset, device, *, untrained: bool = False) -> float:
    """Mean L1 (images in [-1, 1]) between generated and real held-out scenes, features encoded from the real image."""
    total = 0.0
    for i in range(len(dataset)):
        item = dataset[i]
        label, inst, real = (item[k].unsqueeze(0).to(device) for k in ("label", "inst", "image"))
        fake = model.inference(label, inst, real)
        total += (fake - real).abs().mean().item()
    return total / len(dataset)


def run_demo(out: Path, device: torch.device, minutes: float = 5.0, seed: int = 0) -> int:
    from .data import create_dataset, make_synthetic
    from .encode_features import encode_features
    from .features import load_clusters
    from .inference import load_run
    from .pix2pixhd import Pix2PixHD
    from .training import Trainer

    started = time.time()
    if out.exists() and any(out.iterdir()):
        if not (out / "checkpoints" / "demo").exists():
            print(f"fastp2phd demo: {out} exists and is not a demo folder; choose another --out")
            return 1
        shutil.rmtree(out)  # an earlier demo run: start over
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] writing {NUM_TRAIN} training and {NUM_TEST} test scenes of {SCENE[0]}x{SCENE[1]} to {out / 'data'}")
    make_synthetic(out / "data", num_train=NUM_TRAIN, num_test=NUM_TEST, height=SCENE[0], width=SCENE[1], seed=seed)

    # Time one epoch, then fit the epochs into the budget (half constant, half decaying learning rate).
    trainer = Trainer(demo_training(out, seed, 1, 0), device)
    t0 = time.time()
    trainer.run()
    epoch_seconds = time.time() - t0
    budget = max(60.0, minutes * 60 - (time.time() - started) - 30)
    epochs = int(max(2, min(200, budget // epoch_seconds)))
    niter = epochs // 2
    print(f"[demo] one epoch takes {epoch_seconds:.1f}s; training {epochs} epochs on {device}")
    Trainer(demo_training(out, seed, niter, epochs - niter, continue_train=True), device).run()  # on from the probe

    print("[demo] encoding and clustering instance features")
    run_folder = out / "checkpoints" / "demo"
    trained = load_run(run_folder, device=device)
    clusters_path = encode_features(trained, demo_data(out, "train", seed), run_folder, batch_size=4, seed=seed,
                                    progress=False)
    trained.clusters = load_clusters(clusters_path)[0]
    test_set = create_dataset(demo_data(out, "test", seed))
    torch.manual_seed(seed + 1)
    untrained = Pix2PixHD(DEMO_MODEL).to(device).eval()
    l1_trained = _l1(trained, test_set, device)
    l1_untrained = _l1(untrained, test_set, device)

    page = HTMLPage(out / "web", "fastp2phd demo: pix2pixHD on synthetic street scenes")
    page.add_text(f"Trained {epochs} epochs on {NUM_TRAIN} scenes ({device}). Mean L1 to the real held-out images: "
                  f"trained {l1_trained:.3f}, untrained {l1_untrained:.3f} (images in [-1, 1]).")
    generator = torch.Generator(device=device).manual_seed(seed)
    for i in range(len(test_set)):
        item = test_set[i]
        label, inst, real = (item[k].unsqueeze(0).to(device) for k in ("label", "inst", "image"))
        page.add_header(Path(item["path"]).stem)
        page.add_images({
            "label": label_to_image(item["label"], 35),
            "encoded_features": tensor_to_image(trained.inference(label, inst, real)[0]),
            "sampled_styles": tensor_to_image(trained.inference(label, inst, generator=generator)[0]),
            "real": tensor_to_image(item["image"]),
        }, prefix=f"test{i:02d}", width=256)

    # One scene, one car, every style the clusters offer for cars.
    item = test_set[0]
    label, inst = item["label"].unsqueeze(0).to(device), item["inst"].unsqueeze(0).to(device)
    cars = [int(v) for v in torch.unique(inst) if 26000 <= int(v) < 27000]
    styles = trained.clusters.get(26)
    if cars and styles is not None:
        car = max(cars, key=lambda v: int((inst == v).sum()))
        page.add_header(f"styles of car {car} in scene {Path(item['path']).stem} (one per cluster)")
        # The same generator seed each time: the other instances keep their sampled style.
        page.add_images({f"style {k}": tensor_to_image(trained.inference(
            label, inst, generator=torch.Generator(device=device).manual_seed(seed), choices={car: k})[0])
            for k in range(styles.shape[0])}, prefix="styles", width=192)
    index = page.save()
    print(f"[demo] done in {time.time() - started:.0f}s: {index.resolve()}")
    print(f"[demo] mean L1 to ground truth on held-out scenes: trained {l1_trained:.3f}, untrained {l1_untrained:.3f}")
    print(f"[demo] edit the test scenes with this model: {sys.executable} -m fastp2phd edit --name demo "
          f"--checkpoints_dir {out / 'checkpoints'}")
    return 0 if l1_trained < l1_untrained else 1
