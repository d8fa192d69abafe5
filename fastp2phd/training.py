"""Training pix2pixHD: the run (data, processes, the loop). A ``Trainer`` holds a ``TrainStep`` (one step:
networks, losses, optimisers, mixed precision) and the run's ``Position``; its ``state_dict`` is what
``train_state`` saves and resumes (checkpoints, exact resume, coarse-to-fine); ``train_report`` writes
the logs, TensorBoard and the web page.

Several processes (``torchrun --nproc_per_node N -m fastp2phd train ...``) each take
a shard of every epoch; G+E and D are wrapped in DistributedDataParallel
separately, so each runs exactly one forward and one backward per step. G's
adversarial pass goes through the bare D with its weights frozen (no gradient
for D there, as in the original where D's step zeroes them anyway). Logged losses
are the mean over the processes; only the main process writes files.
"""
from __future__ import annotations

import math
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from . import train_state
from .collectives import barrier, gather_objects, mean_over_processes, sum_over_processes
from .console import progress_bar
from .errors import Pix2PixHDError
from .files import remove_leftover_temporaries, write_text
from .specs import TrainSpec, recorded_options
from .stopping import LoaderWorkerSignals, StopAgreement, TrainingStopped, stop_between_steps
from .torchrun import first_to_say, peer_stopped, stop_as_torchrun_is_gone, watch_torchrun
from .train_report import TrainingReport
from .train_step import LOSS_NAMES  # noqa: F401  (a re-export)
from .train_step import ImagePool, Position, TrainingError, TrainStep, learning_rate


class EpochSampler(Sampler[int]):
    """This rank's indices of one epoch: a permutation seeded by (seed, epoch) (or the
    dataset in order), sharded over ranks like DistributedSampler (the order repeated until
    every rank has as many), starting after ``skip`` of this rank's samples so that a
    resumed epoch continues where it stopped."""

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
        total = self.per_rank() * self.world
        order = (order * math.ceil(total / self.size))[:total]  # pad (repeatedly) so every rank gets as many
        return iter(order[self.rank::self.world][self.skip:])

    def __len__(self) -> int:
        return self.per_rank() - self.skip


def bf16_is_emulated(dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether autocast in ``dtype`` on ``device`` is bfloat16 on a CPU without native bfloat16 instructions."""
    from .diagnostics import cpu_bf16

    return dtype == torch.bfloat16 and device.type == "cpu" and cpu_bf16() is None


def drops_last_batch(spec: TrainSpec, device: torch.device, sampler: EpochSampler) -> bool:
    """Whether the loader drops a smaller last batch: CUDA graphs replay one batch size (--compile
    reduce-overhead on a GPU); not when this process's share of an epoch is less than a batch (its one
    batch would be dropped, and the run would train on nothing)."""
    return spec.compile == "reduce-overhead" and device.type == "cuda" and sampler.per_rank() >= spec.batchSize


def collate(items: list[dict]) -> dict:
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class Trainer:
    """Everything one training run needs; ``run()`` trains to the last epoch.

    Its resumable parts: ``step`` (the networks, optimisers and grad scaler: a ``TrainStep``, whose image
    pool is this process's own), ``position`` (epoch and iterations; the sampler starts each epoch from it),
    the random state and the count of pixels per class. ``state_dict()`` / ``load_state_dict()`` take and
    restore all of them: what ``train_state`` saves and resumes."""

    def __init__(self, spec: TrainSpec, device: torch.device):
        from .data import AlignedDataset, DatasetError, create_dataset

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.distributed = self.world > 1
        if self.distributed:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if device.type == "cuda":
                if local_rank >= torch.cuda.device_count():  # (set_device would say "invalid device ordinal")
                    raise TrainingError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} "
                                        f"processes on this machine, which has {torch.cuda.device_count()} GPU(s): "
                                        "give --nproc_per_node at most that (one GPU each)")
                device = torch.device("cuda", local_rank)
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if "TORCHELASTIC_RUN_ID" in os.environ:
                watch_torchrun(self.rank, _say_error)
        if self.distributed and spec.model.norm == "batch":
            raise TrainingError("--norm batch is not supported with several processes: its statistics would mix "
                                "real and generated images; use --norm instance")
        self.is_main = self.rank == 0
        self.spec, self.device = spec, device
        self.run_folder = spec.run_folder
        trained = sorted(self.run_folder.glob("*_net_G.pth")) if not spec.continue_train else []
        if trained:  # its first save would overwrite a trained run
            raise TrainingError(f"{self.run_folder} already holds a trained run ({trained[0].name}): continue it with "
                                "--continue_train, or give the new run another --name (or remove those files)")
        if spec.continue_train:
            train_state.check_resumable(self.run_folder, spec.which_epoch)
        _check_coarse_to_fine(spec, warn=self.is_main)
        if self.is_main:
            _make_folder(self.run_folder)
            remove_leftover_temporaries(self.run_folder)

        data = spec.data
        if data.resize_or_crop == "none":  # the files alone decide the step's size: refuse one that cannot fit
            from .memory import device_memory, training_bytes_per_pixel

            data = data.replace(step_bytes_per_pixel=training_bytes_per_pixel(spec, device.type),
                                step_device_memory=device_memory(device))
        torch.manual_seed(spec.seed)  # (after the estimate, which builds networks)
        try:
            self.dataset = create_dataset(data)
            len(self.dataset)
            if isinstance(self.dataset, AlignedDataset):  # a bad file found now, not hours into an epoch
                self.dataset.check_headers()
        except DatasetError as exc:
            raise TrainingError(str(exc)) from None
        if len(self.dataset) == 0:
            raise TrainingError(f"the dataset at {spec.data.dataroot} holds no images")
        self.sampler = EpochSampler(len(self.dataset), not spec.serial_batches, spec.seed, self.rank, self.world)
        if self.is_main and spec.batchSize > self.sampler.per_rank():  # (the original trains so too, without a word)
            images = f"{self.sampler.per_rank()} image(s) each process reads" if self.world > 1 else (
                f"{len(self.dataset)} image(s) of the dataset")
            warnings.warn(f"--batchSize {spec.batchSize} is larger than the {images}, so every batch holds only "
                          f"those; lower --batchSize, or add images", stacklevel=2)
        self.worker_signals = LoaderWorkerSignals()
        self.loader = DataLoader(self.dataset, batch_size=spec.batchSize, sampler=self.sampler,
                                 num_workers=spec.nThreads, collate_fn=collate,
                                 drop_last=drops_last_batch(spec, device, self.sampler),
                                 pin_memory=device.type == "cuda", persistent_workers=False,
                                 worker_init_fn=self.worker_signals)

        self.position = Position()
        self.step = TrainStep(spec, device, position=self.position)
        if self.rank:  # each process's pool draws its own choices, as one pool draws for each image of a batch
            self.step.pool = ImagePool(spec.pool_size, spec.seed * 1000003 + self.rank)
        # Pixels of each class this process has trained on (train_state writes the run's total).
        self.class_pixels = torch.zeros(spec.model.label_nc, dtype=torch.int64) if spec.model.label_nc else None
        self.report = TrainingReport(self.run_folder, spec.name, write=self.is_main, html=not spec.no_html,
                                     tensorboard=spec.tf_log, label_nc=spec.model.label_nc)
        if spec.continue_train:
            train_state.resume(self)
            self.report.forget_after(self.position)
        elif spec.load_pretrain:
            train_state.start_from(self, Path(spec.load_pretrain))
        if self.distributed:
            self.step.distribute()
        # Under torchrun the processes agree on the step to stop after, on a signal; None: no store to agree in.
        self.stop_agreement = StopAgreement.of_process_group(
            lambda: stop_as_torchrun_is_gone(self.rank, _say_error)) if self.distributed else None
        if self.is_main:  # once the data and what the run resumes from are accepted: a failed start keeps opt.txt
            write_text(self.run_folder / "opt.txt", recorded_options(spec.options()))

    def state_dict(self) -> dict:
        """The run's resumable state, as ``<label>_train_state.pth`` holds it (less its version): the position,
        the step's state, every process's image pool, the random state, the processes and the pixels of each
        class trained on. With several processes every one calls it: it gathers their pools and counts."""
        pools = [self.step.pool.state_dict()]
        class_pixels = self.class_pixels
        if self.distributed:
            pools = gather_objects(self.step.pool.state_dict(), self.device)
            if class_pixels is not None:  # each process counted its own batches
                class_pixels = sum_over_processes(class_pixels, self.device)
        position = self.position.state_dict()
        if position["epoch_iter"] >= len(self.dataset):  # an epoch's end is the next one's start, as in iter.txt
            position.update(epoch=position["epoch"] + 1, epoch_iter=0)
        return {
            **position, **self.step.state_dict(), "pools": pools,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "world": self.world, "class_pixels": class_pixels,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s output (a KeyError names what a damaged one lacks). A state of
        another number of processes keeps its networks and position; the pools start empty."""
        self.position.load_state_dict(state)
        self.step.load_state_dict(state)
        pools = state["pools"]
        counted = state.get("class_pixels")  # the run's total: the main process carries it on
        if self.is_main and counted is not None and self.class_pixels is not None:
            self.class_pixels = counted.clone()
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state.get("world", 1) != self.world or len(pools) != self.world:
            self.say(f"note: resuming a run of {state['world']} process(es) with {self.world}: the data order of the "
                     "current epoch changes, and the image pools start empty")
        else:
            self.step.pool.load_state_dict(pools[self.rank], self.device)

    def start_at(self, epoch: int, epoch_iter: int) -> None:
        """Continue networks saved without the rest of a state (the original code's checkpoints) at
        ``epoch``, ``epoch_iter``: G's optimiser starts afresh."""
        self.position.load_state_dict({"epoch": epoch, "epoch_iter": epoch_iter,
                                       "total_steps": self.position.total_steps})
        self.step.restart_optimizer_G(fix_global=epoch <= self.spec.niter_fix_global)

    def update(self, batch: dict) -> tuple[dict[str, float], torch.Tensor]:
        """One step on ``batch``: the loss values and the generated images (the demo reports progress here)."""
        return self.step.step(batch)

    def say(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def save(self, label: str) -> None:
        train_state.save(self, label)

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        return mean_over_processes(values, self.device) if self.distributed else values

    def _crossed(self, before: int, freq: int) -> bool:
        return before // freq != self.position.total_steps // freq

    def run(self) -> dict[str, float]:
        """Train to epoch niter + niter_decay; returns the losses of the last step (the mean over the processes)."""
        from .data import DatasetError

        spec, step, at = self.spec, self.step, self.position
        last_epoch = spec.niter + spec.niter_decay
        dataset_size = len(self.dataset)
        if at.epoch_iter >= dataset_size:  # a checkpoint taken at the very end of an epoch
            at.epoch, at.epoch_iter = at.epoch + 1, 0
        self.say(f"training {spec.name}: {dataset_size} images, epochs {at.epoch}..{last_epoch}, "
                 f"{self.world} process(es) on {self.device}")
        if bf16_is_emulated(step.amp_dtype, self.device):
            self.say("note: --fp16 runs bfloat16 on this CPU without AVX512-BF16 or AMX (see `fastp2phd info`), which "
                     "is often slower than fp32: drop --fp16 to train in fp32")
        started = at.total_steps
        after = "a step every process agrees on" if self.distributed else "this step"
        with stop_between_steps(self.say, not self.distributed or self.stop_agreement is not None, after) as stop:
            try:
                values = self._epochs(last_epoch, dataset_size, stop)
            except DatasetError:
                # A bad file met mid-run (ids beyond --label_nc, say: the header check before the first step does
                # not decode): keep what was trained since the last save. (One process only: a save takes every
                # process, and under torchrun the others are stopping with this one.)
                if not self.distributed and at.total_steps > started:
                    self.say(f"saving the latest model (epoch {at.epoch}, total steps {at.total_steps}) before "
                             "stopping: once the file is fixed, --continue_train goes on from there")
                    self.save("latest")
                raise
        self.report.close()
        # (Every process trained as many steps: all take part. A logged step's values are a mean already.)
        return self._mean_over_processes(values) if values else values

    def _epochs(self, last_epoch: int, dataset_size: int, stop) -> dict[str, float]:
        """The epochs from the position on; a stop request (fastp2phd.stopping) ends them after its step is saved."""
        spec, step, at = self.spec, self.step, self.position
        values: dict[str, float] = {}
        while at.epoch <= last_epoch:
            if step.fixed_global and at.epoch > spec.niter_fix_global:
                step.train_whole_generator()
                self.say(f"epoch {at.epoch}: training the whole generator")
            step.set_learning_rate(learning_rate(spec, at.epoch))
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(at.epoch)
            self.sampler.set_epoch(at.epoch, skip=math.ceil(at.epoch_iter / self.world))
            progress = progress_bar(dataset_size, f"epoch {at.epoch}", self.is_main and not spec.no_progress)
            progress.update(at.epoch_iter)
            start = time.time()
            with self.worker_signals.batches(self.loader) as batches:
                while (batch := next(batches, None)) is not None:
                    before = at.total_steps
                    values, fake = self.update(batch)
                    if self.class_pixels is not None:  # (once the step has trained on them)
                        self.class_pixels += torch.bincount(batch["label"].reshape(-1), minlength=spec.model.label_nc)
                    done = len(batch["path"]) * self.world
                    at.epoch_iter = min(at.epoch_iter + done, dataset_size)
                    at.total_steps += done
                    progress.update(done)
                    progress.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
                    if self._crossed(before, spec.print_freq):
                        values = self._mean_over_processes(values)
                        self.report.log(values, at.epoch, at.epoch_iter, at.total_steps,
                                        (time.time() - start) / max(1, done))
                    if self._crossed(before, spec.display_freq):
                        self.report.display(batch, fake, at.epoch, at.epoch_iter, at.total_steps)
                    if (signum := self._stop_after_this_step(stop)) is not None:
                        self._save_and_stop(signum, progress)
                    if self._crossed(before, spec.save_latest_freq):
                        self._save_latest()
                    start = time.time()
            progress.close()
            at.epoch_iter = dataset_size
            if at.epoch % spec.save_epoch_freq == 0 or at.epoch == last_epoch:
                self.say(f"saving the model at the end of epoch {at.epoch}")
                self.save("latest")
                if at.epoch % spec.save_epoch_freq == 0:
                    self.save(str(at.epoch))
            at.epoch, at.epoch_iter = at.epoch + 1, 0
        return values

    def _stop_after_this_step(self, stop) -> signal.Signals | None:
        """The signal to stop on now: the one received, or under torchrun the one every process agreed on."""
        return stop.signal if self.stop_agreement is None else self.stop_agreement.after_step(stop.signal)

    def _save_latest(self) -> None:
        self.say(f"saving the latest model (epoch {self.position.epoch}, total steps {self.position.total_steps})")
        self.save("latest")

    def _save_and_stop(self, signum: signal.Signals, progress) -> NoReturn:
        self._save_latest()
        progress.close()
        raise TrainingStopped(f"stopped by {signum.name} at epoch {self.position.epoch}, total steps "
                              f"{self.position.total_steps}, and saved: add --continue_train to go on from there",
                              signum)


def _make_folder(folder) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise TrainingError(f"cannot make the run folder {folder}: a file is in the way (--checkpoints_dir and "
                            "--name must name folders)") from None
    except OSError as exc:
        raise TrainingError(f"cannot make the run folder {folder} ({exc.strerror or exc}); choose another "
                            "--checkpoints_dir") from None


def train(spec: TrainSpec, device: torch.device) -> dict[str, float]:
    """Run a training; returns the last losses."""
    trainer = Trainer(spec, device)
    try:
        values = trainer.run()
        if trainer.distributed:
            barrier()  # every process finished before any tears the group down
        return values
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _check_coarse_to_fine(spec: TrainSpec, warn: bool) -> None:
    """--netG local starts from a trained G1 (--load_pretrain) in pix2pixHD's recipe; freezing an untrained one is
    never what was meant."""
    if spec.model.netG != "local" or spec.load_pretrain or spec.continue_train:
        return
    if spec.niter_fix_global:
        raise TrainingError(f"--niter_fix_global {spec.niter_fix_global} trains only the local enhancer around G1, "
                            "which without --load_pretrain is untrained; pass --load_pretrain with the folder of a "
                            "trained --netG global run, or drop --niter_fix_global")
    if warn:
        warnings.warn("--netG local without --load_pretrain trains G1 and the local enhancer together from scratch; "
                      "pix2pixHD's recipe first trains a --netG global run and starts from it with --load_pretrain",
                      stacklevel=2)


def main_train(spec: TrainSpec, device: torch.device) -> int:
    try:
        train(spec, device)
    except TrainingStopped as exc:
        if first_to_say(str(exc)):  # (under torchrun every process stopped so)
            _say_error(str(exc))
        return 128 + exc.signal  # (as a process ended by that signal reports it)
    except Pix2PixHDError as exc:  # anything else is a bug, and keeps its traceback
        # Data problems raised in a loader worker come back with the worker's traceback
        # in the message: keep its last line, the sentence that says what is wrong (without "module.Error: ").
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        message = re.sub(r"^[\w.]+Error: ", "", message)
        if first_to_say(message):
            _say_error(message)
        return 1
    except RuntimeError as exc:
        if not peer_stopped(exc):
            raise
        # The process that failed said why; a traceback from every other one would bury its sentence.
        _say_error(f"process {os.environ.get('RANK', '?')} stopped because another process of this run stopped "
                   "(its message says why)")
        return 1
    return 0


def _say_error(sentence: str) -> None:
    # One write for the line: torchrun's unbuffered processes printed sentence and newline apart, and two
    # processes stopping at once interleaved them.
    sys.stderr.write(f"fastp2phd train: {sentence}\n")
    sys.stderr.flush()
