"""Loading official pix2pixHD checkpoints, and explaining the ones that do not fit.

Checkpoints written by the original code (``latest_net_G.pth`` ...) are plain
state_dicts keyed by ``nn.Sequential`` indices; fastp2phd's networks use the
same keys, so ``load_state_dict(sd, strict=True)`` just works. When a
checkpoint comes from another configuration, the networks read the options it
was saved with off its shapes and raise ``CheckpointMismatchError`` naming the
keys that differ and the options (and pix2pixHD flags) to change.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointReadError, CheckpointReadFileNotFound, Pix2PixHDError
from ..files import load_torch


class CheckpointMismatchError(Pix2PixHDError, RuntimeError):
    """A state_dict whose keys or shapes do not fit the network it is loaded into."""


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _examples(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def indexed_weights(state_dict: Mapping[str, Any], prefix: str) -> dict[int, tuple[int, ...]]:
    """{i: shape} of every ``<prefix>.<i>.weight`` (one Sequential's own layers)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.weight$")
    found = {}
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match:
            found[int(match.group(1))] = _shape(value)
    return dict(sorted(found.items()))


def count_blocks(state_dict: Mapping[str, Any], prefix: str) -> int:
    """Number of distinct ``<prefix>.<i>.conv_block`` residual blocks."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.conv_block\.")
    return len({m.group(1) for m in map(pattern.match, state_dict) if m})


class OfficialCheckpointMixin:
    """``load_state_dict`` that explains a checkpoint saved with other options.

    A network sets ``self.options`` (its constructor options) and implements
    ``options_from_state_dict`` (the same options read off a checkpoint's shapes)
    and ``FLAGS`` (option -> the pix2pixHD command-line flags behind it).
    """

    FLAGS: dict[str, str] = {}
    options: dict[str, Any]
    __jit_ignored_attributes__ = ["options"]  # a type TorchScript does not know; forward does not read it there

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def option_changes(cls, options: Mapping[str, Any], state_dict: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """(option, the checkpoint's value, ``options``' value) for each constructor option ``state_dict``'s
        shapes say otherwise; empty when they cannot be read. Needs no network: a loader checks a checkpoint
        against the options it would build from before building anything."""
        try:
            theirs = cls.options_from_state_dict(state_dict)
        except Exception:  # shapes too unlike this network to read options off
            return []
        return [(name, theirs[name], options[name]) for name in theirs
                if name in options and theirs[name] is not None and theirs[name] != options[name]]

    def checkpoint_hint(self, state_dict: Mapping[str, Any]) -> str:
        """What to change so that ``state_dict`` fits; empty when it cannot be told."""
        changes = [f"{name}={theirs!r} (this model has {ours!r}; {self.FLAGS.get(name, name)})"
                   for name, theirs, ours in self.option_changes(self.options, state_dict)]
        if not changes:
            return ""
        return " The checkpoint was saved with " + "; ".join(changes) + ": build the model with those options."

    def describe_mismatch(self, state_dict: Mapping[str, Any]) -> str | None:
        """None when ``state_dict`` fits exactly, else one message listing what differs and why."""
        name = type(self).__name__
        if not isinstance(state_dict, Mapping):
            return f"{name}: expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}"
        own = {k: tuple(v.shape) for k, v in nn.Module.state_dict(self).items()}
        theirs = {k: _shape(v) for k, v in state_dict.items()}
        missing = [k for k in own if k not in theirs]
        unexpected = [k for k in theirs if k not in own]
        differing = [
            f"{k} (checkpoint {theirs[k]}, model {own[k]})" for k in own if k in theirs and theirs[k] != own[k]
        ]
        if not (missing or unexpected or differing):
            return None
        problems = []
        if missing:
            problems.append(f"{len(missing)} keys missing from the checkpoint ({_examples(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
        if differing:
            problems.append(f"{len(differing)} shapes differ ({_examples(differing)})")
        message = f"{name}: the checkpoint does not fit this model: " + "; ".join(problems) + "."
        if theirs and all(k.startswith("module.") for k in theirs):
            return message + " Its keys start with 'module.' (saved from DataParallel): load it with fastp2phd.models.load_network."
        return message + self.checkpoint_hint(state_dict)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            problem = self.describe_mismatch(state_dict)
            if problem is not None:
                raise CheckpointMismatchError(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def load_matching(network: nn.Module, state_dict: Mapping[str, Any]) -> tuple[int, list[str]]:
    """Load the tensors of ``state_dict`` whose name and shape ``network`` has and leave the rest of ``network`` as
    it is: the original code's fallback when a pretrained network does not fit (e.g. a D trained with --num_D 2
    starting a run with --num_D 3). Returns how many tensors were loaded, and the top-level children not loaded
    in full."""
    own = nn.Module.state_dict(network)
    fitting = {k: v for k, v in state_dict.items()
               if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(own[k].shape)}
    nn.Module.load_state_dict(network, {**own, **fitting}, strict=True)
    return len(fitting), sorted({k.split(".")[0] for k in own if k not in fitting})


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A state_dict from a path (loaded with ``weights_only=True`` on the CPU) or a mapping.

    Strips the ``module.`` prefix that DataParallel/DistributedDataParallel adds.
    """
    if isinstance(source, Mapping):
        state_dict = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise CheckpointReadFileNotFound(
                f"checkpoint {path!r} does not exist; check --checkpoints_dir, --name and --which_epoch")
        state_dict = load_torch(path)
        if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise CheckpointReadError(f"checkpoint {path!r} holds a {type(state_dict).__name__}, not a state_dict "
                                      "(names to tensors); check that it is a network's file")
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_network(network: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Load an official or fastp2phd checkpoint into ``network`` strictly; returns ``network``."""
    network.load_state_dict(read_state_dict(source), strict=True)
    return network
