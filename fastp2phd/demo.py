"""``make demo`` / ``fastp2phd demo``: the whole pix2pixHD workflow on built-in synthetic scenes.

Writes a small Cityscapes-style dataset, trains a small pix2pixHD with instance
features for a fixed number of epochs (so the result does not depend on how busy
the machine is), encodes and clusters the instance features, generates held-out
scenes, renders one scene in every style of one car, and writes everything to a
web page. It ends by printing the page's path and the mean L1 distance to the real
held-out images of three pictures: each class painted in its mean training colour
(the baseline a model must beat to have learned more than class colours), the
untrained model's and the trained model's. The exit status says whether the
trained model beat the baseline.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import torch

from .console import TimeLeft
from .specs import DataSpec, ModelSpec, TrainSpec
from .training import Trainer
from .visualize import HTMLPage, label_to_image, tensor_to_image

SCENE = (128, 256)  # height, width of the demo scenes: cars, people and poles visible, trainable on 2 CPU cores
NUM_TRAIN, NUM_TEST = 96, 16
NITER, NITER_DECAY = 10, 10  # epochs at the starting learning rate, then of linear decay to zero

# A small pix2pixHD with instance features. Batch norm (the original's --norm batch) and one downsampling
# learn these simple scenes in far fewer steps than instance norm and four.
DEMO_MODEL = ModelSpec(label_nc=35, instance_feat=True, feat_num=3, nef=8, n_downsample_E=1, n_clusters=6,
                       ngf=16, n_downsample_global=1, n_blocks_global=3, norm="batch")


# Instances are clustered above this relative area (the original's 0.5 is 512 pixels at 128x256, more than
# most people and poles have): people get styles too.
DEMO_AREA_THRESHOLD = 0.02


def demo_data(out: Path, phase: str, seed: int, *, train: bool = False, read_images: bool = True) -> DataSpec:
    return DataSpec.for_model(DEMO_MODEL, dataroot=str(out.resolve() / "data"), phase=phase, resize_or_crop="none",
                              train=train, read_images=read_images, seed=seed)


def demo_training(out: Path, seed: int, niter: int = NITER, niter_decay: int = NITER_DECAY) -> TrainSpec:
    """What `fastp2phd train ...` would run for the demo. ``lambda_l1`` adds an L1 loss to the real image,
    which the original does not have: it is what lets a few minutes on a CPU learn more than class colours."""
    return TrainSpec(
        model=DEMO_MODEL, data=demo_data(out, "train", seed, train=True), name="demo",
        checkpoints_dir=str(out / "checkpoints"), ndf=16, num_D=2, n_layers_D=2, no_vgg_loss=True, lambda_l1=100.0,
        lr=0.001, niter=niter, niter_decay=niter_decay, nThreads=0, seed=seed, batchSize=4, no_progress=True,
        print_freq=NUM_TRAIN, display_freq=4 * NUM_TRAIN, save_latest_freq=100000, save_epoch_freq=1000,
    )


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _say(text: str) -> None:
    # Flushed: piped (make demo | tee), stdout is block-buffered and nothing showed until the first epoch ended.
    print(f"[demo] {text}", flush=True)


PROGRESS_EVERY = 20.0  # seconds between lines within an epoch: under load one takes over a minute


class _DemoTrainer(Trainer):
    """The demo's training, printing a line per epoch (how far it is, the time left and the losses) and, unless
    ``progress`` is off, the scenes done every PROGRESS_EVERY seconds within an epoch (plain lines: tqdm is an
    optional extra and its bar garbles a piped log)."""

    def __init__(self, spec: TrainSpec, device: torch.device, progress: bool = True, clock=time.monotonic):
        super().__init__(spec, device)
        self.progress, self.clock = progress, clock

    def run(self) -> dict[str, float]:
        self.started = self.said = self.clock()
        self.time_left = TimeLeft(self.spec.niter + self.spec.niter_decay, clock=self.clock)
        _say(f"training {self.spec.niter + self.spec.niter_decay} epochs on {self.device}: epoch 1 started")
        return super().run()

    def update(self, batch: dict) -> tuple[dict[str, float], torch.Tensor]:
        values, fake = super().update(batch)
        last, epoch = self.spec.niter + self.spec.niter_decay, self.position.epoch
        done, now = self.position.epoch_iter + len(batch["path"]), self.clock()
        if done >= len(self.dataset):  # the epoch's last batch
            losses = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "G_VGG" or not self.spec.no_vgg_loss)
            self.time_left.step()
            _say(f"epoch {epoch}/{last} done, {_clock(now - self.started)} so far, {self.time_left} ({losses})")
            self.said = now
        elif self.progress and now - self.said >= PROGRESS_EVERY:
            _say(f"epoch {epoch}/{last}: {done}/{len(self.dataset)} scenes, {_clock(now - self.started)} so far")
            self.said = now
        return values, fake


def class_mean_colours(dataset, label_nc: int) -> torch.Tensor:
    """(label_nc, 3): the mean colour of each class over the dataset's images (zero for classes it lacks)."""
    sums = torch.zeros(label_nc, 3, dtype=torch.float64)
    counts = torch.zeros(label_nc, dtype=torch.float64)
    for i in range(len(dataset)):
        item = dataset[i]
        ids = item["label"].flatten()
        sums.index_add_(0, ids, item["image"].reshape(3, -1).T.double())
        counts.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))
    return (sums / counts.clamp(min=1)[:, None]).float()


def _mean_l1(dataset, device: torch.device, paint) -> float:
    """Mean L1 (images in [-1, 1]) between ``paint(label, inst, real)`` and the real held-out scenes."""
    total = 0.0
    for i in range(len(dataset)):
        item = dataset[i]
        label, inst, real = (item[k].unsqueeze(0).to(device) for k in ("label", "inst", "image"))
        total += (paint(label, inst, real) - real).abs().mean().item()
    return total / len(dataset)


def _fid(trained, out: Path, device: torch.device, seed: int) -> str:
    """FID and KID of the trained model's held-out scenes (sampled styles, as `fastp2phd test` makes them)
    against the real ones when the FID Inception weights are there; else how to get them."""
    from .evaluate import (FID_WEIGHTS_URL, EvaluationError, EvaluationSpec, evaluate,
                           find_fid_weights, pair_results, write_report)
    from .inference import run_test

    try:
        find_fid_weights()
    except EvaluationError:
        return (f"FID: not computed, its Inception weights are missing: download {FID_WEIGHTS_URL} into "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}/ (no other setup), then score the held-out scenes "
                f"with `fastp2phd evaluate --name demo --checkpoints_dir {out / 'checkpoints'} --dataroot "
                f"{out / 'data'} --resize_or_crop none --results_dir {out / 'results'}` (or run the demo again)")
    _say("scoring the held-out scenes with FID and KID")
    results = out / "results"
    run_test(trained, demo_data(out, "test", seed, read_images=False), results, seed=seed, progress=False)
    report = evaluate(pair_results(results, out / "data"), EvaluationSpec(seed=seed), device, progress=False)
    write_report(report, results, title="fastp2phd demo: held-out scenes")
    kid = report["kid"]
    return (f"FID {report['fid']:.1f}, KID {kid['mean']:.4f} ± {kid['std']:.4f} over the {report['images']} held-out "
            f"scenes with sampled styles (so few images make FID biased upwards; KID is not), in {results}")


# What a demo writes into --out, which --overwrite replaces.
DEMO_PARTS = ("data", "checkpoints/demo", "web", "results")


def _prepare(out: Path, overwrite: bool) -> str | None:
    """Make ``out`` ready for a demo; the sentence that says why not when it cannot be."""
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a folder; choose another --out"
    if out.exists() and any(out.iterdir()):
        if not (out / "checkpoints" / "demo").exists():
            return f"{out} is not empty and holds no earlier demo; choose another --out"
        if not overwrite:
            return (f"{out} holds an earlier demo; pass --overwrite to replace it (its checkpoints and saved edits "
                    "too), or choose another --out")
        for part in DEMO_PARTS:  # the demo's own: another run in checkpoints/, or the user's files, stay
            if (out / part).is_dir():
                shutil.rmtree(out / part)
        with contextlib.suppress(OSError):  # (only when empty)
            (out / "checkpoints").rmdir()
    out.mkdir(parents=True, exist_ok=True)
    return None


def run_demo(out: Path, device: torch.device, seed: int = 0, overwrite: bool = False, progress: bool = True) -> int:
    from .data import create_dataset, make_synthetic
    from .encode_features import encode_features
    from .features import load_clusters
    from .inference import load_run
    from .models import init_weights
    from .pix2pixhd import Pix2PixHD

    started = time.time()
    problem = _prepare(out, overwrite)
    if problem:
        print(f"fastp2phd demo: {problem}", file=sys.stderr)
        return 1
    _say(f"writing {NUM_TRAIN} training and {NUM_TEST} test scenes of {SCENE[0]}x{SCENE[1]} to {out / 'data'}")
    make_synthetic(out / "data", num_train=NUM_TRAIN, num_test=NUM_TEST, height=SCENE[0], width=SCENE[1], seed=seed)

    spec = demo_training(out, seed)
    _say("building the model")
    _DemoTrainer(spec, device, progress).run()

    _say("encoding and clustering instance features")
    run_folder = out / "checkpoints" / "demo"
    trained = load_run(run_folder, device=device)
    clusters_path = encode_features(trained, demo_data(out, "train", seed), run_folder, batch_size=4, seed=seed,
                                    progress=False, area_threshold=DEMO_AREA_THRESHOLD)
    trained.clusters = load_clusters(clusters_path)[0]
    colours = class_mean_colours(create_dataset(demo_data(out, "train", seed)), DEMO_MODEL.label_nc).to(device)
    test_set = create_dataset(demo_data(out, "test", seed))
    torch.manual_seed(seed + 1)
    untrained = Pix2PixHD(DEMO_MODEL).apply(init_weights).to(device).eval()  # where training starts
    l1 = {
        "class-mean colours": _mean_l1(test_set, device, lambda label, inst, real: colours[label[:, 0]].permute(0, 3, 1, 2)),
        "untrained model": _mean_l1(test_set, device, untrained.inference),
        "trained model": _mean_l1(test_set, device, trained.inference),
    }
    summary = (f"Mean L1 to the {NUM_TEST} real held-out images (images in [-1, 1], lower is better): "
               + ", ".join(f"{k} {v:.3f}" for k, v in l1.items())
               + ". The baseline paints each class in its mean colour over the training images; the models' "
               "instance features are encoded from the real image, as pix2pixHD tests with real images.")

    _say("generating the held-out scenes and the web page")
    page = HTMLPage(out / "web", "fastp2phd demo: pix2pixHD on synthetic street scenes")
    page.add_text(f"Trained {spec.niter + spec.niter_decay} epochs on {NUM_TRAIN} scenes ({device}). {summary}")
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
            for k in range(styles.shape[0])}, prefix="styles", width=256)
    index = page.save()
    _say(f"done in {_clock(time.time() - started)}: {index.resolve()}")
    _say(f"mean L1 to the {NUM_TEST} real held-out images (images in [-1, 1], lower is better):")
    _say("  " + " | ".join(f"{k:>18}" for k in l1))
    _say("  " + " | ".join(f"{v:>18.3f}" for v in l1.values()))
    _say("the baseline paints each class in its mean colour over the training images; the models' instance "
         "features are encoded from the real image (as pix2pixHD tests with real images)")
    _say(_fid(trained, out, device, seed))
    _say(f"edit the test scenes with this model: {sys.executable} -m fastp2phd edit --name demo "
         f"--checkpoints_dir {out / 'checkpoints'}")
    if l1["trained model"] >= l1["class-mean colours"]:
        print("[demo] the trained model did not beat the class-mean colours: it learned no more than class colours",
              file=sys.stderr)
        return 1
    return 0
