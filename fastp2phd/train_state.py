"""A training run's checkpoints: the networks under the original names, the state that resumes a run
exactly, and starting from an earlier run (coarse-to-fine).

``save`` writes ``<label>_net_G.pth`` (``_net_D``, ``_net_E``): plain state_dicts the original code
loads; and ``<label>_train_state.pth``: the trainer's ``state_dict()`` (the weights again, the optimisers,
the grad scaler, the position, the random state and every process's image pool) and its version, so that
``resume`` continues bit for bit through ``load_state_dict()``. A checkpoint's files are saved as one
unit (``fastp2phd.files.save_file_set``). ``resume`` also takes a folder of the original code's
checkpoints (networks and ``iter.txt``, no optimiser state).
``classes.json`` records how many pixels of each class the run has trained on, so that the editor
can tell the classes the model knows from those it never saw (``trained_classes``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .collectives import barrier
from .errors import InvalidArgumentError
from .files import load_torch, save_file_set
from .models.checkpoint import CheckpointMismatchError, load_matching, read_state_dict
from .train_step import TrainingError

if TYPE_CHECKING:
    from .training import Trainer

STATE_VERSION = 2  # 2: one image pool per process (1: the main process's pool only)
CLASSES_FILE = "classes.json"


def save(trainer: Trainer, label: str) -> None:
    """Write the networks and the train state under ``label`` ("latest" or an epoch). Every process
    calls it (the trainer's state gathers their image pools); the main one writes."""
    state = {"version": STATE_VERSION, **trainer.state_dict()}
    if trainer.is_main:
        _write(trainer.run_folder, label, state)
    if trainer.distributed:
        barrier()  # nobody runs ahead (or exits) while the main process writes


def _write(folder: Path, label: str, state: dict) -> None:
    """All of a checkpoint's files as one unit: a resume never mixes two saves."""
    with save_file_set(folder, "checkpoint") as files:
        class_pixels = state["class_pixels"]
        if class_pixels is not None:
            files.write_text(CLASSES_FILE, json.dumps({"label_nc": len(class_pixels), "pixels": class_pixels.tolist()}))
        for key in ("G", "D", "E"):
            if f"net{key}" in state:
                files.save_torch(state[f"net{key}"], f"{label}_net_{key}.pth")
        files.save_torch(state, f"{label}_train_state.pth")
        files.write_text("iter.txt", f"{state['epoch']},{state['epoch_iter']}\n")


def check_resumable(folder: Path, label: str) -> None:
    """Refuse --continue_train where there is nothing to continue (checked before the run folder is made, the data
    read or VGG loaded)."""
    if not (folder / f"{label}_train_state.pth").is_file() and not (folder / f"{label}_net_G.pth").is_file():
        raise TrainingError(
            f"--continue_train found nothing to continue in {folder} (no {label}_train_state.pth or "
            f"{label}_net_G.pth); drop --continue_train to start a new run, or check --name and --which_epoch"
        )


def resume(trainer: Trainer) -> None:
    """Continue the run from ``<which_epoch>_train_state.pth``, or from the original code's networks."""
    label = trainer.spec.which_epoch
    path = trainer.run_folder / f"{label}_train_state.pth"
    if path.is_file():
        _resume_state(trainer, path)
    else:
        _resume_networks(trainer, label)


def _resume_state(trainer: Trainer, path: Path) -> None:
    state = load_torch(path, "train state")
    if not isinstance(state, dict) or "version" not in state:
        raise TrainingError(f"{path} is not a train state fastp2phd wrote (it holds a {type(state).__name__}); "
                            "remove it to continue from the networks, or choose another --which_epoch")
    if state["version"] not in (1, STATE_VERSION):
        raise TrainingError(f"{path} was written by another version of fastp2phd's trainer (state version "
                            f"{state['version']}, this one reads 1 and {STATE_VERSION}); continue it with that version")
    if "E" in trainer.step.networks() and "netE" not in state:
        raise TrainingError(f"{path} has no encoder: it was trained without --instance_feat/--label_feat")
    try:
        if state["version"] < 2:  # the main process's pool alone
            state = {**state, "pools": [state["pool"]]}
        trainer.load_state_dict(state)
    except KeyError as exc:
        raise TrainingError(f"{path} lacks {exc} of a train state: it is damaged; remove it to continue from "
                            "the networks") from None
    except CheckpointMismatchError as exc:  # (it named the network, not the file)
        raise TrainingError(f"{path}: {exc}") from None
    trainer.say(f"resuming from {path} at epoch {state['epoch']}, iteration {state['epoch_iter']}")


def _resume_networks(trainer: Trainer, label: str) -> None:
    """An original pix2pixHD checkpoint: networks and iter.txt, no optimiser state."""
    folder = trainer.run_folder
    g_path = folder / f"{label}_net_G.pth"  # (there: check_resumable)
    nets = trainer.step.networks()
    _load(nets["G"], g_path)
    for key in ("D", "E"):
        net_path = folder / f"{label}_net_{key}.pth"
        if key in nets and net_path.is_file():
            _load(nets[key], net_path)
    epoch, epoch_iter = 1, 0
    iter_path = folder / "iter.txt"
    if label.isdigit():  # saved at the end of that epoch (iter.txt is latest's position)
        epoch = int(label) + 1
    elif iter_path.is_file():
        text = iter_path.read_text(errors="replace")
        try:
            epoch, epoch_iter = (int(float(v)) for v in text.replace(",", " ").split()[:2])
            if epoch < 1 or epoch_iter < 0:  # (a run at epoch -3 trained from there, saving checkpoints "-10", ...)
                raise ValueError(text)
        except (ValueError, OverflowError):  # (OverflowError: 'inf')
            raise TrainingError(f"{iter_path} holds {text.strip()[:40]!r}, not 'epoch,iteration' (an epoch from 1, "
                                "images from 0); fix it, or remove it to start counting from epoch 1") from None
    trainer.start_at(epoch, epoch_iter)
    trainer.say(f"resuming from the networks in {folder} (no optimiser state) at epoch {epoch}, "
                f"iteration {epoch_iter}")


def _load(net, path: Path) -> None:
    """``path``'s state_dict into ``net``; a file of another network or options is a sentence naming it."""
    try:
        net.load_state_dict(read_state_dict(path))
    except CheckpointMismatchError as exc:
        raise TrainingError(f"{path}: {exc}") from None


def start_from(trainer: Trainer, folder: Path) -> None:
    """Coarse-to-fine: start from a trained run (a G1 for --netG local), D and E included when present."""
    label = trainer.spec.which_epoch
    g_path = folder / f"{label}_net_G.pth"
    if not g_path.is_file():
        raise TrainingError(f"--load_pretrain {folder} holds no {g_path.name}: pass the folder (checkpoints_dir/name) "
                            "of a trained --netG global run, and a --which_epoch it saved")
    state = read_state_dict(g_path)
    nets = trainer.step.networks()
    try:
        if trainer.spec.model.netG == "local" and not any(k.startswith("model1_") for k in state):
            nets["G"].load_global_generator(state)
        else:
            nets["G"].load_state_dict(state)
    except (CheckpointMismatchError, InvalidArgumentError) as exc:
        raise TrainingError(f"--load_pretrain {g_path}: {exc}") from None
    for key in ("D", "E"):
        path = folder / f"{label}_net_{key}.pth"
        if key in nets and path.is_file():
            state = read_state_dict(path)
            try:
                nets[key].load_state_dict(state)
            except CheckpointMismatchError:  # e.g. another --num_D: what fits is loaded, as in the original
                loaded, fresh = load_matching(nets[key], state)
                trainer.say(f"{path.name} does not fit this run's {key}: " + (
                    f"loaded the {loaded} tensors that fit; {', '.join(fresh)} start afresh" if loaded else
                    f"none of its tensors fit, so {key} starts afresh"))
    trainer.say(f"started from the networks in {folder}")


def trained_classes(folder: str | Path) -> list[int] | None:
    """The class ids a run trained on (those with pixels in ``classes.json``); None when the run did not record them."""
    path = Path(folder) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        pixels = json.loads(path.read_text())["pixels"]
        if not all(isinstance(n, int) for n in pixels):
            raise InvalidArgumentError("pixel counts are not integers")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"{path} is unreadable ({exc}); the trained classes are guessed instead", stacklevel=2)
        return None
    return [i for i, n in enumerate(pixels) if n > 0]
