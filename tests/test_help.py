"""Help texts, the version, the ops' documented contracts, and the benchmark report's links."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import fastp2phd
from fastp2phd import ops
from fastp2phd.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "-h"] if argv else ["-h"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"fastp2phd {fastp2phd.__version__}"


@pytest.mark.parametrize("command", ["train", "test", "memory", "encode-features", "export-onnx", "edit",
                                     "make-synthetic", "demo", "evaluate"])
def test_every_command_has_a_description_defaults_and_an_example(command, capsys):
    text = help_text(capsys, command)
    assert "examples:" in text and f"fastp2phd {command}" in text.split("examples:")[1]
    assert "(default:" in text


def test_train_help_shows_the_original_defaults(capsys):
    text = " ".join(help_text(capsys, "train").split())
    assert "epochs at the starting learning rate (default: 100)" in text
    assert "--checkpoint_activations" in text


def test_edit_help_lists_only_what_editing_needs(capsys):
    text = help_text(capsys, "edit")
    for option in ("--name", "--checkpoints_dir", "--which_epoch", "--dataroot", "--port", "--host", "--phase"):
        assert option in text
    for option in ("--ngf", "--netG", "--label_nc", "--fp16", "--batchSize", "--resize_or_crop"):
        assert option not in text


@pytest.mark.parametrize("op, words", [
    (ops.boundary_map, ["4 neighbours", "borders never make edges", "(N, 1, H, W)", "uint8", "bool"]),
    (ops.instance_mean, ["(N, C, H, W)", "(N, 1, H, W)", "segment", "summed in float64", "forward-mode AD"]),
    (ops.instance_norm_act, ["biased variance", "leaky_relu", "channels_last", "1x1 plane gives 0"]),
])
def test_each_op_documents_its_contract(op, words):
    doc = " ".join(op.__doc__.split())
    for word in words:
        assert word in doc, word


def test_every_link_of_the_benchmark_report_resolves():
    report = ROOT / "bench" / "REPORT.md"
    text = report.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    runs = re.findall(r"run `([^`]+\.json)`", text)
    assert links and runs
    missing = [link for link in links if not (report.parent / link).is_file()]
    missing += [run for run in runs if not (ROOT / "bench" / "results" / run).is_file()]
    assert not missing, missing


def test_the_readme_workflow_list_names_every_command():
    readme = (ROOT / "README.md").read_text()
    workflow = readme.split("- **The workflow**")[1].split("\n\n")[0]
    commands = build_parser()._subparsers._group_actions[0].choices
    assert [c for c in commands if f"`{c}`" not in workflow] == []


def sections(text: str) -> dict[str, str]:
    """The help's sections (an argument group each), by title."""
    parts = re.split(r"^(\S[^\n]*):\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("command", ["train", "test", "edit", "encode-features", "export-onnx"])
def test_which_epoch_is_listed_with_the_run_not_with_the_features(command, capsys):
    text = sections(help_text(capsys, command))
    assert "--which_epoch" in text["experiment"]
    assert "--which_epoch" not in text.get("instance-wise features", "")


@pytest.mark.parametrize("command", list(build_parser()._subparsers._group_actions[0].choices))
def test_every_option_states_its_default_at_most_once(command, capsys):
    # A help that says its default got a second "(default: None)" from argparse; flags got "(default: False)".
    for entry in re.split(r"\n(?=  -)", help_text(capsys, command)):
        entry = " ".join(entry.split())
        assert entry.count("(default") <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry


@pytest.mark.parametrize("command", ["test", "encode-features", "export-onnx"])
def test_commands_that_load_a_run_list_its_network_options_as_overrides(command, capsys):
    text = sections(help_text(capsys, command))
    overrides = text.pop("overrides of the run's opt.txt")
    for option in ("--ngf ", "--netG ", "--label_nc ", "--norm ", "--instance_feat ", "--n_clusters "):
        assert option in overrides and not any(option in section for section in text.values()), option
    assert "(default" not in overrides.split("\n\n", 1)[1]  # their values come from opt.txt
