"""The command line and the library agree: every flag that names a spec field (ModelSpec, DataSpec,
TrainSpec) has the spec's default, so changing a default in one place cannot silently split CLI
behaviour from library behaviour; flags that are not spec fields are listed here on purpose."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from fastp2phd.cli import build_parser
from fastp2phd.specs import DataSpec, ModelSpec, TrainSpec

SPECS = (ModelSpec, DataSpec, TrainSpec)
# Where a command's default differs from the spec's on purpose.
COMMAND_DEFAULTS = {
    ("test", "phase"): "test", ("edit", "phase"): "test", ("evaluate", "phase"): "test",
    ("evaluate", "name"): None,  # evaluate scores a results folder; a run name is optional there
}
_RUN = ("allow_pickle", "cluster_path", "device", "precision", "verbose")
CLI_ONLY = {
    "train": ("debug", "device", "verbose"),
    "test": (*_RUN, "how_many", "optimize", "results_dir", "use_encoded_image"),
    "evaluate": (*_RUN, "fid_batch_size", "fid_weights", "how_many", "kid_subset_size", "kid_subsets", "no_fid",
                 "optimize", "out", "results", "results_dir", "seg_mean", "seg_model", "seg_std", "use_encoded_image"),
    "memory": ("debug", "device", "inference", "json", "measure", "size", "verbose"),
    "encode-features": ("area_threshold", "device", "verbose"),
    "export-onnx": ("device", "onnx", "verbose"),
    "edit": (*_RUN, "host", "max_scenes", "no_optimize", "port"),
    "make-synthetic": ("height", "num_test", "num_train", "out", "width"),
    "demo": ("device", "out", "overwrite"),
    "info": (),
}


def _spec_defaults() -> dict:
    defaults = {}
    for spec in SPECS:
        for f in dataclasses.fields(spec):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    return defaults


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subcommands.choices)


@pytest.mark.parametrize("command", sorted(CLI_ONLY))
def test_every_flag_is_a_spec_field_with_its_default_or_a_listed_cli_only_flag(command):
    defaults = _spec_defaults()
    actions = {a.dest: a for a in _commands()[command]._actions if a.dest != "help"}
    assert sorted(dest for dest in actions if dest not in defaults) == sorted(CLI_ONLY[command])
    for dest, action in actions.items():
        if dest in defaults:
            expected = COMMAND_DEFAULTS.get((command, dest), defaults[dest])
            assert action.default == expected, f"{command} --{dest}: CLI default {action.default!r}, spec {expected!r}"


def test_the_listed_commands_are_all_the_commands_and_each_has_one_function():
    from fastp2phd.cli import COMMANDS

    assert set(_commands()) == set(CLI_ONLY) == set(COMMANDS)
