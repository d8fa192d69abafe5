"""Training pix2pixHD: data, coarse-to-fine, several GPUs, checkpoints that survive a crash and
resume exactly, logs and a web page of results. One step (networks, losses, optimisers, mixed
precision) is ``fastp2phd.train_step.TrainStep``, which ``Trainer`` extends.

Several processes (``torchrun --nproc_per_node N -m fastp2phd train ...``) each take
a shard of every epoch; G+E and D are wrapped in DistributedDataParallel
separately, so each runs exactly one forward and one backward per step. G's
adversarial pass goes through the bare D with its weights frozen (no gradient
for D there, as in the original where D's step zeroes them anyway). Only rank 0
writes files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from .console import progress_bar
from .files import load_torch, save_torch, write_text
from .models.checkpoint import CheckpointMismatchError, read_state_dict
from .train_step import (LOSS_NAMES, ImagePool, TrainingError, TrainStep, amp_dtype, frozen,  # noqa: F401
                         learning_rate, split_batch)
from .visualize import HTMLPage, label_to_image, tensor_to_image

STATE_VERSION = 1


class EpochSampler(Sampler[int]):
    """This rank's indices of one epoch: a permutation seeded by (seed, epoch) (or the
    dataset in order), sharded over ranks like DistributedSampler, starting after
    ``skip`` of this rank's samples so that a resumed epoch continues where it stopped."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch = 1
        self.skip = 0

    def per_rank(self) -> int:
        return math.ceil(self.size / self.world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(self.size)
        order = order.tolist()
        order += order[: self.per_rank() * self.world - self.size]  # pad so every rank gets as many
        return iter(order[self.rank::self.world][self.skip:])

    def __len__(self) -> int:
        return self.per_rank() - self.skip


def collate(items: list[dict]) -> dict:
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


# ----------------------------------------------------------------------------- the trainer


class Trainer(TrainStep):
    """Everything one training run needs; ``run()`` trains to the last epoch."""

    def __init__(self, opt: argparse.Namespace, device: torch.device):
        from .data import DatasetError, create_dataset

        self.opt = opt
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.distributed = self.world > 1
        if self.distributed:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if device.type == "cuda":
                device = torch.device("cuda", local_rank)
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if self.distributed and opt.norm == "batch":
            raise TrainingError("--norm batch is not supported with several processes: its statistics would mix "
                                "real and generated images; use --norm instance")
        self.is_main = self.rank == 0
        self.save_dir = Path(opt.checkpoints_dir) / opt.name
        if self.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self._write_options()

        torch.manual_seed(opt.seed)
        try:
            self.dataset = create_dataset(opt)
            len(self.dataset)
        except DatasetError as exc:
            raise TrainingError(str(exc)) from None
        if len(self.dataset) == 0:
            raise TrainingError(f"the dataset at {opt.dataroot} holds no images")
        self.sampler = EpochSampler(len(self.dataset), not opt.serial_batches, opt.seed, self.rank, self.world)
        self.loader = DataLoader(self.dataset, batch_size=opt.batchSize, sampler=self.sampler, num_workers=opt.nThreads,
                                 collate_fn=collate, drop_last=False, pin_memory=device.type == "cuda",
                                 persistent_workers=False)

        super().__init__(opt, device)
        if opt.continue_train:
            self._resume()
        elif opt.load_pretrain:
            self._load_pretrain(Path(opt.load_pretrain))
        self._wrap()

        self.log_txt = self.save_dir / "loss_log.txt"
        self.log_jsonl = self.save_dir / "loss_log.jsonl"
        self.web = HTMLPage(self.save_dir / "web", f"Experiment name = {opt.name}", refresh=30) if (
            self.is_main and not opt.no_html) else None
        self.tb = self._tensorboard() if (self.is_main and opt.tf_log) else None

    # ------------------------------------------------------------------ setup helpers
    def _write_options(self) -> None:
        lines = ["------------ Options -------------"]
        lines += [f"{k}: {v}" for k, v in sorted(vars(self.opt).items())]
        lines.append("-------------- End ----------------")
        write_text(self.save_dir / "opt.txt", "\n".join(lines) + "\n")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainingError("--tf_log needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.save_dir / "logs"))

    def _wrap(self) -> None:
        """DistributedDataParallel around G(+E) and D when several processes train."""
        if not self.distributed:
            self.gen, self.disc = self.model, self.netD
            return
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.gen = DistributedDataParallel(self.model, device_ids=ids)
        self.disc = DistributedDataParallel(self.netD, device_ids=ids)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        state = {
            "version": STATE_VERSION,
            "epoch": self.epoch, "epoch_iter": self.epoch_iter, "total_steps": self.total_steps,
            "fixed_global": self.fixed_global,
            "netG": self.model.netG.state_dict(), "netD": self.netD.state_dict(),
            "optimizer_G": self.optimizer_G.state_dict(), "optimizer_D": self.optimizer_D.state_dict(),
            "scaler": self.scaler.state_dict(), "pool": self.pool.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "world": self.world,
        }
        if self.model.netE is not None:
            state["netE"] = self.model.netE.state_dict()
        return state

    def save(self, label: str) -> None:
        """Networks under the original names, plus ``<label>_train_state.pth`` for exact resume.

        Each file is written to a temporary name and renamed; the training state
        holds its own copy of the weights, so it is always consistent by itself.
        """
        if not self.is_main:
            return
        save_torch(self.model.netG.state_dict(), self.save_dir / f"{label}_net_G.pth")
        save_torch(self.netD.state_dict(), self.save_dir / f"{label}_net_D.pth")
        if self.model.netE is not None:
            save_torch(self.model.netE.state_dict(), self.save_dir / f"{label}_net_E.pth")
        save_torch(self._state(), self.save_dir / f"{label}_train_state.pth")
        write_text(self.save_dir / "iter.txt", f"{self.epoch},{self.epoch_iter}\n")

    def _resume(self) -> None:
        label = self.opt.which_epoch
        path = self.save_dir / f"{label}_train_state.pth"
        if path.is_file():
            state = load_torch(path)
            if state.get("version") != STATE_VERSION:
                raise TrainingError(f"{path} was written by another version of fastp2phd's trainer")
            self.model.netG.load_state_dict(state["netG"])
            self.netD.load_state_dict(state["netD"])
            if self.model.netE is not None:
                if "netE" not in state:
                    raise TrainingError(f"{path} has no encoder: it was trained without --instance_feat/--label_feat")
                self.model.netE.load_state_dict(state["netE"])
            self.epoch, self.epoch_iter, self.total_steps = state["epoch"], state["epoch_iter"], state["total_steps"]
            self.optimizer_G = self.make_optimizer_G(fix_global=state["fixed_global"])
            self.optimizer_G.load_state_dict(state["optimizer_G"])
            self.optimizer_D.load_state_dict(state["optimizer_D"])
            self.scaler.load_state_dict(state["scaler"])
            self.pool.load_state_dict(state["pool"], self.device)
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            if state.get("world", 1) != self.world:
                self._say(f"note: resuming a run of {state['world']} processes with {self.world}: "
                          "the data order of the current epoch changes")
            self._say(f"resuming from {path} at epoch {self.epoch}, iteration {self.epoch_iter}")
            return
        # An original pix2pixHD checkpoint: networks and iter.txt, no optimiser state.
        g_path = self.save_dir / f"{label}_net_G.pth"
        if not g_path.is_file():
            raise TrainingError(
                f"--continue_train found nothing to continue in {self.save_dir} (no {label}_train_state.pth or "
                f"{label}_net_G.pth); drop --continue_train to start a new run, or check --name and --which_epoch"
            )
        self.model.netG.load_state_dict(read_state_dict(g_path))
        for net, key in ((self.netD, "D"), (self.model.netE, "E")):
            net_path = self.save_dir / f"{label}_net_{key}.pth"
            if net is not None and net_path.is_file():
                net.load_state_dict(read_state_dict(net_path))
        iter_path = self.save_dir / "iter.txt"
        if iter_path.is_file():
            epoch, epoch_iter = (int(float(v)) for v in iter_path.read_text().replace(",", " ").split()[:2])
            self.epoch, self.epoch_iter = epoch, epoch_iter
        self.optimizer_G = self.make_optimizer_G(fix_global=self.epoch <= self.opt.niter_fix_global)
        self._say(f"resuming from the networks in {self.save_dir} (no optimiser state) at epoch {self.epoch}, "
                  f"iteration {self.epoch_iter}")

    def _load_pretrain(self, folder: Path) -> None:
        """Coarse-to-fine: start from a trained run (a G1 for --netG local), D and E included when present."""
        label = self.opt.which_epoch
        g_path = folder / f"{label}_net_G.pth"
        if not g_path.is_file():
            raise TrainingError(f"--load_pretrain {folder}: {g_path.name} is not there")
        state = read_state_dict(g_path)
        if self.opt.netG == "local" and not any(k.startswith("model1_") for k in state):
            self.model.netG.load_global_generator(state)
        else:
            self.model.netG.load_state_dict(state)
        for net, key in ((self.netD, "D"), (self.model.netE, "E")):
            path = folder / f"{label}_net_{key}.pth"
            if net is not None and path.is_file():
                try:
                    net.load_state_dict(read_state_dict(path))
                except CheckpointMismatchError as exc:  # e.g. another --num_D: D starts afresh, as in the original
                    self._say(f"not starting {key} from {path.name}: {exc}")
        self._say(f"started from the networks in {folder}")

    # ------------------------------------------------------------------ the loop
    def _say(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def _log(self, values: dict[str, float], seconds: float) -> None:
        if not self.is_main:
            return
        text = (f"(epoch: {self.epoch}, iters: {self.epoch_iter}, time: {seconds:.3f}) "
                + " ".join(f"{k}: {v:.3f}" for k, v in values.items()))
        with open(self.log_txt, "a") as f:
            f.write(text + "\n")
        with open(self.log_jsonl, "a") as f:
            f.write(json.dumps({"epoch": self.epoch, "epoch_iter": self.epoch_iter, "total_steps": self.total_steps,
                                "seconds_per_image": seconds, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, self.total_steps)

    def _display(self, batch: dict, fake: torch.Tensor) -> None:
        if self.web is None:
            return
        self.web.add_header(f"epoch {self.epoch}, iteration {self.epoch_iter}")
        self.web.add_images({
            "input_label": label_to_image(batch["label"][0], self.opt.label_nc),
            "synthesized_image": tensor_to_image(fake[0]),
            "real_image": tensor_to_image(batch["image"][0]),
        }, prefix=f"epoch{self.epoch:03d}_iter{self.total_steps}")
        self.web.save()

    def _crossed(self, before: int, freq: int) -> bool:
        return before // freq != self.total_steps // freq

    def run(self) -> dict[str, float]:
        """Train to epoch niter + niter_decay; returns the last logged losses."""
        opt = self.opt
        last_epoch = opt.niter + opt.niter_decay
        values: dict[str, float] = {}
        dataset_size = len(self.dataset)
        if self.epoch_iter >= dataset_size:  # a checkpoint taken at the very end of an epoch
            self.epoch, self.epoch_iter = self.epoch + 1, 0
        self._say(f"training {opt.name}: {dataset_size} images, epochs {self.epoch}..{last_epoch}, "
                  f"{self.world} process(es) on {self.device}")
        while self.epoch <= last_epoch:
            if self.fixed_global and self.epoch > opt.niter_fix_global:
                self.optimizer_G = self.make_optimizer_G(fix_global=False)  # now fine-tune all of G
                self._wrap()
                self._say(f"epoch {self.epoch}: training the whole generator")
            lr = learning_rate(opt, self.epoch)
            for optimizer in (self.optimizer_G, self.optimizer_D):
                for group in optimizer.param_groups:
                    group["lr"] = lr
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch, skip=math.ceil(self.epoch_iter / self.world))
            progress = progress_bar(dataset_size, f"epoch {self.epoch}", self.is_main and not opt.no_progress)
            progress.update(self.epoch_iter)
            start = time.time()
            for batch in self.loader:
                before = self.total_steps
                values, fake = self.step(batch)
                done = len(batch["path"]) * self.world
                self.epoch_iter = min(self.epoch_iter + done, dataset_size)
                self.total_steps += done
                progress.update(done)
                progress.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
                if self._crossed(before, opt.print_freq):
                    self._log(values, (time.time() - start) / max(1, done))
                if self._crossed(before, opt.display_freq):
                    self._display(batch, fake)
                if self._crossed(before, opt.save_latest_freq):
                    self._say(f"saving the latest model (epoch {self.epoch}, total steps {self.total_steps})")
                    self.save("latest")
                start = time.time()
            progress.close()
            self.epoch_iter = dataset_size
            if self.epoch % opt.save_epoch_freq == 0 or self.epoch == last_epoch:
                self._say(f"saving the model at the end of epoch {self.epoch}")
                self.save("latest")
                if self.epoch % opt.save_epoch_freq == 0:
                    self.save(str(self.epoch))
            self.epoch, self.epoch_iter = self.epoch + 1, 0
        if self.tb is not None:
            self.tb.close()
        return values


def train(opt: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Run a training from options; returns the last losses."""
    trainer = Trainer(opt, device)
    try:
        return trainer.run()
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()


def main_train(opt: argparse.Namespace, device: torch.device) -> int:
    from .data import DatasetError

    try:
        train(opt, device)
    except (TrainingError, DatasetError, CheckpointMismatchError, ValueError) as exc:
        # Data problems raised in a loader worker come back with the worker's traceback
        # in the message: keep its last line, the sentence that says what is wrong.
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"fastp2phd train: {message}", file=sys.stderr)
        return 1
    return 0
