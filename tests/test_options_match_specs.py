"""The command line and the library agree: every flag that names a spec field (ModelSpec, DataSpec,
TrainSpec) is built from that field's one declaration (``option(...)``: default, help, choices, parser),
so changing a default in one place cannot silently split CLI behaviour from library behaviour, and a flag
declared a second time by hand fails here; flags that are not spec fields are listed here on purpose."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from fastp2phd.cli import build_parser
from fastp2phd.specs import DataSpec, ModelSpec, TrainSpec, declared_options

SPECS = (ModelSpec, DataSpec, TrainSpec)
# Where a command's default differs from the spec's on purpose.
COMMAND_DEFAULTS = {
    ("test", "phase"): "test", ("edit", "phase"): "test", ("evaluate", "phase"): "test",
    ("evaluate", "name"): None,  # evaluate scores a results folder; a run name is optional there
}
# Where a command's help differs from the declaration's on purpose (it names what the command does).
COMMAND_HELP = {("edit", "phase"), ("encode-features", "phase"), ("evaluate", "name"), ("test", "compile"),
                ("evaluate", "compile"), ("make-synthetic", "seed"), ("demo", "seed"), ("demo", "no_progress")}
# The original code's flags that every command building a model accepts (fastp2phd.options._add_original_flags).
_ORIGINAL = ("aspect_ratio", "data_type", "display_winsize", "gpu_ids", "local_rank", "ntest", "original_model",
             "use_dropout")
_RUN = ("allow_pickle", "cluster_path", "device", "precision", "verbose", *_ORIGINAL)
CLI_ONLY = {
    "train": ("debug", "device", "verbose", *_ORIGINAL),
    "test": (*_RUN, "how_many", "optimize", "results_dir", "use_encoded_image"),
    "evaluate": (*_RUN, "fid_batch_size", "fid_weights", "how_many", "kid_subset_size", "kid_subsets", "no_fid",
                 "optimize", "out", "results", "results_dir", "seg_mean", "seg_model", "seg_std", "use_encoded_image"),
    "memory": ("debug", "device", "inference", "json", "measure", "precision", "size", "verbose", *_ORIGINAL),
    "encode-features": ("area_threshold", "device", "verbose", *_ORIGINAL),
    "export-onnx": ("device", "onnx", "verbose", *_ORIGINAL),
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


@pytest.mark.parametrize("command", sorted(CLI_ONLY))
def test_every_spec_flag_is_built_from_its_one_declaration(command):
    declared = declared_options()
    for action in _commands()[command]._actions:
        if action.dest not in declared:
            continue
        f, where = declared[action.dest], f"{command} --{action.dest}"
        option = f.metadata["option"]
        assert getattr(action, "spec_field", None) is f, f"{where} is declared by hand, not from its spec field"
        assert action.default == COMMAND_DEFAULTS.get((command, action.dest), f.default), where
        if action.help != argparse.SUPPRESS and (command, action.dest) not in COMMAND_HELP:
            assert action.help == option.help, where
        assert action.choices == option.choices, where
        if isinstance(f.default, bool):
            assert isinstance(action, argparse._StoreTrueAction), where
        else:
            assert getattr(action.type, "__wrapped__", action.type) is option.parse, where
            assert action.const == option.bare, where


def test_each_option_is_declared_once_and_its_copies_in_other_specs_agree():
    declared = declared_options()
    names = [f.name for spec in SPECS for f in dataclasses.fields(spec) if "option" in f.metadata]
    assert len(names) == len(set(names)) == len(declared)
    for spec in SPECS:
        for f in dataclasses.fields(spec):
            if f.name in declared and "option" not in f.metadata:  # (DataSpec's label_nc, seed, ...)
                assert f.default == declared[f.name].default, f"{spec.__name__}.{f.name}"


def test_each_option_has_a_help_a_section_and_a_parser_the_spec_checks_agree_with():
    from fastp2phd.option_fields import non_negative_int, positive_int
    from fastp2phd.specs import SpecError

    for name, f in declared_options().items():
        option = f.metadata["option"]
        assert option.help and option.group, name
        spec = next(spec for spec in SPECS if name in {g.name for g in dataclasses.fields(spec)})
        bad = {positive_int: 0, non_negative_int: -1}.get(option.parse, "not one" if option.choices else None)
        if bad is not None:
            with pytest.raises(SpecError, match=name):
                spec(**{name: bad})
