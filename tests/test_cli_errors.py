"""The command line's error contract: every error a user can fix is a Pix2PixHDError and ends in one
sentence with exit status 1; a file the system refuses names the file; anything else is a bug and
keeps its traceback (no ``except ValueError`` that would hide one)."""
from __future__ import annotations

import pytest

from fastp2phd import cli
from fastp2phd.errors import InvalidArgumentError, Pix2PixHDError
from fastp2phd.features import save_clusters
from fastp2phd.pix2pixhd import autocast_dtype


def test_library_value_errors_are_pix2pixhd_errors_and_still_value_errors():
    with pytest.raises(InvalidArgumentError) as caught:
        autocast_dtype("fp8", "cpu")
    assert isinstance(caught.value, Pix2PixHDError) and isinstance(caught.value, ValueError)
    with pytest.raises(Pix2PixHDError, match="class ids must be integers"):
        save_clusters("unused.npz", {"car": [[1.0, 2.0]]})


def test_a_refused_path_is_one_sentence_naming_it(tmp_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    assert cli.main(["make-synthetic", "--out", str(blocker / "scenes"), "--num_train", "1", "--num_test", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastp2phd make-synthetic: ") and "\n" not in err and str(blocker) in err, err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("a bug, not a user's mistake")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["info"])


@pytest.mark.parametrize("command", ["train", "info"])
def test_ctrl_c_is_one_sentence_and_status_130(command, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    assert cli.main([command]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    resume = "; its last save is intact: add --continue_train to go on from there" if command == "train" else ""
    assert err == f"fastp2phd {command}: interrupted{resume}"


def test_an_unknown_option_is_refused_by_its_command_with_the_option_it_likely_meant(capsys):
    # argparse said "fastp2phd: error: unrecognized arguments" under the top level's usage, which lists no option
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", "--labelnc", "35", "--name", "x", "--results_dir", "out"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastp2phd train" in err and err.rstrip().endswith(
        "fastp2phd train: error: unrecognized arguments: --labelnc (did you mean --label_nc?) 35 --results_dir out"), err
