"""The files commands write or read back besides checkpoints (test_file_sets.py has those): opt.txt, iter.txt,
the loss logs, the results pages, clusters, ONNX exports, the editor's saved scenes, the demo's folder and the
bench's results. Each is replaced whole or not at all, never replaces a file of another kind, stays inside the
folder it belongs to, and a damaged one is one sentence naming it."""
from __future__ import annotations

import re
import shutil

import pytest

from fastp2phd.cli import main
from fastp2phd.data import make_synthetic
from fastp2phd.files import write_text
from fastp2phd.specs import SpecError, TrainSpec
from support import TINY, TRAIN, copy_run, one_sentence, train_tiny_run

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run"))


def run_args(command, ck, data, *extra):
    return [command, "--name", "run", "--checkpoints_dir", str(ck), "--dataroot", str(data), "--device", "cpu",
            "--no_progress", *extra]


def test_a_folder_where_a_file_goes_is_named_not_the_temporary(tmp_path):
    (tmp_path / "opt.txt").mkdir()
    with pytest.raises(OSError) as caught:
        write_text(tmp_path / "opt.txt", "x")
    assert caught.value.filename == str(tmp_path / "opt.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["opt.txt"]  # and no temporary is left


@pytest.mark.parametrize("name", ["../escaped", "a/../../escaped", "ABSOLUTE", ""])
def test_a_run_name_never_leads_out_of_the_checkpoints_folder(name, tmp_path, capsys):
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    data = make_synthetic(tmp_path / "data", num_train=2, num_test=1, height=32, width=64, seed=3)
    ck = tmp_path / "inside" / "ck"
    with pytest.raises(SystemExit, match="2"):
        main(["train", "--name", name, "--checkpoints_dir", str(ck), "--dataroot", str(data), *TINY, *TRAIN])
    assert "argument --name: must be a folder name inside --checkpoints_dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written anywhere
    with pytest.raises(SpecError, match="name must be a folder name inside"):
        TrainSpec(name=name)


def test_a_checkpoint_label_is_a_file_name_and_a_nested_run_name_is_fine(trained, tmp_path, capsys):
    ck, data = trained
    with pytest.raises(SystemExit, match="2"):
        main(run_args("test", ck, data, "--which_epoch", "../../x", "--results_dir", str(tmp_path / "r")))
    assert "argument --which_epoch: must be 'latest' or an epoch number" in capsys.readouterr().err
    shutil.copytree(ck / "run", tmp_path / "ck" / "exp" / "run")
    argv = run_args("test", tmp_path / "ck", data, "--results_dir", str(tmp_path / "results"))
    argv[argv.index("run")] = "exp/run"
    assert main(argv) == 0
    assert (tmp_path / "results" / "exp" / "run" / "test_latest" / "index.html").is_file()


def test_the_editor_s_test_command_names_the_checkpoints_folder_of_a_nested_run(tmp_path, monkeypatch):
    import shlex

    from fastp2phd.cli import parse
    from fastp2phd.editing import server
    from fastp2phd.errors import InvalidArgumentError
    from support import tiny_model

    shown = []

    def load_editor(*args, test_command, **kwargs):
        shown.append(test_command)
        raise InvalidArgumentError("enough")

    monkeypatch.setattr(server, "load_editor", load_editor)
    run = tmp_path / "ck" / "exp" / "run"
    assert server.main_edit(tiny_model(), None, name="exp/run", run_folder=run, host="127.0.0.1", port=0,
                            max_scenes=1, seed=0) == 1
    opt = parse(shlex.split(shown[0])[3:])
    assert (opt.name, opt.checkpoints_dir) == ("exp/run", str(tmp_path / "ck"))


@pytest.mark.parametrize("damage", ["empty", "cut short"])
def test_an_opt_txt_cut_short_is_one_sentence_not_default_options(damage, trained, tmp_path, capsys):
    """Options lost from the end of opt.txt would silently read as their defaults (loadSize, resize_or_crop, ...)."""
    ck, data = copy_run(trained, tmp_path)
    opt_txt = ck / "run" / "opt.txt"
    text = opt_txt.read_text()
    opt_txt.write_text("" if damage == "empty" else text[:len(text) // 2])
    assert main(run_args("test", ck, data, "--results_dir", str(tmp_path / "results"))) == 1
    one_sentence(capsys, f"fastp2phd test: {opt_txt} is {damage}", "restore it from a copy")
    assert not (tmp_path / "results").exists()
    opt_txt.write_text(text.replace("-------------- End ----------------\n", "-------------- End ----------------"))
    assert main(run_args("test", ck, data, "--results_dir", str(tmp_path / "results"))) == 0  # (a last newline lost)


@pytest.mark.parametrize("text", ["inf,0\n", "-3,0\n", "2,-1\n", "nan\n0\n", ""])
def test_an_iter_txt_that_is_no_position_is_one_sentence(text, trained, tmp_path, capsys):
    """iter.txt is where a run of the original code's checkpoints (no train state) goes on from."""
    ck, data = copy_run(trained, tmp_path)
    (ck / "run" / "latest_train_state.pth").unlink()
    (ck / "run" / "iter.txt").write_text(text)
    before = sorted(p.name for p in (ck / "run").iterdir())
    assert main(["train", "--continue_train", "--name", "run", "--checkpoints_dir", str(ck), "--dataroot", str(data),
                 *TINY, *TRAIN]) == 1
    one_sentence(capsys, f"{ck / 'run' / 'iter.txt'} holds", "not 'epoch,iteration'")
    assert sorted(p.name for p in (ck / "run").iterdir()) == before and (ck / "run" / "iter.txt").read_text() == text


def test_a_resume_keeps_log_lines_that_are_not_utf8_byte_for_byte(trained, tmp_path):
    ck, data = copy_run(trained, tmp_path)
    logs = [ck / "run" / "loss_log.txt", ck / "run" / "loss_log.jsonl"]
    for log in logs:
        with open(log, "ab") as f:
            f.write(b"note \xff\xfe latin-1: caf\xe9\x0c\n")
    kept = [log.read_bytes() for log in logs]
    argv = ["train", "--continue_train", "--name", "run", "--checkpoints_dir", str(ck), "--dataroot", str(data),
            *TINY, *TRAIN]
    argv[argv.index("--niter") + 1] = "2"
    assert main(argv) == 0
    for log, before in zip(logs, kept):
        assert log.read_bytes().startswith(before)  # then the second epoch's lines


def test_test_outputs_keep_scene_names_so_evaluate_pairs_them_and_the_page_links_them(trained, tmp_path):
    """Scenes "scene one" and "scene_one" both get their images (spaces were made '_': one overwrote the other and
    evaluate found no label map for either), and names with '#' or '%' link to their files."""
    from urllib.parse import unquote

    from fastp2phd.evaluate import pair_results

    ck, data = trained
    names = ["scene one", "scene_one", "straße #2 100%"]
    for kind in ("label", "inst", "img"):
        (tmp_path / "data" / f"test_{kind}").mkdir(parents=True)
        source = sorted((data / f"test_{kind}").iterdir())[0]
        for name in names:
            shutil.copy(source, tmp_path / "data" / f"test_{kind}" / f"{name}.png")
    assert main(run_args("test", ck, tmp_path / "data", "--results_dir", str(tmp_path / "results"))) == 0
    web = tmp_path / "results" / "run" / "test_latest"
    pairs = pair_results(web, tmp_path / "data", "test")
    assert sorted(p.name for p in pairs) == sorted(names)
    assert all(p.generated.name == f"{p.name}_synthesized_image.png" for p in pairs)
    links = re.findall(r'href="([^"]+)"', (web / "index.html").read_text())
    assert len(links) == 6 and all("#" not in link and (web / unquote(link)).is_file() for link in links)


def test_a_saved_scene_keeps_class_ids_above_255(tmp_path):
    import numpy as np
    import torch

    from fastp2phd.data import create_dataset, render_scene
    from fastp2phd.editing import EditSession
    from fastp2phd.pix2pixhd import Pix2PixHD
    from fastp2phd.specs import DataSpec, ModelSpec

    spec = ModelSpec(label_nc=300, ngf=4, n_downsample_global=2, n_blocks_global=1)
    label, inst, _ = render_scene(32, 64, seed=4)
    label = label.astype(np.int64)
    label[:4] = 290
    torch.manual_seed(0)
    EditSession(Pix2PixHD(spec).eval(), label, inst, seed=0).save(tmp_path / "edits", "s")
    item = create_dataset(DataSpec.for_model(spec, dataroot=str(tmp_path / "edits"), phase="test",
                                             resize_or_crop="none"))[0]
    assert np.array_equal(item["label"][0].numpy(), label)


def test_an_onnx_export_is_one_file_that_runs_where_it_is_moved(trained, tmp_path):
    """torch's exporter put the weights in '<its file>.data': our hidden temporary's name, which the graph kept."""
    ort = pytest.importorskip("onnxruntime")
    ck, data = trained
    assert main(run_args("export-onnx", ck, data, "--onnx", str(tmp_path / "out" / "g.onnx"))) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["g.onnx"]
    shutil.move(tmp_path / "out" / "g.onnx", tmp_path / "moved.onnx")
    ort.InferenceSession(str(tmp_path / "moved.onnx"), providers=["CPUExecutionProvider"])


def test_weights_too_large_for_one_onnx_file_go_beside_it_under_its_name(trained, tmp_path, monkeypatch):
    import onnx

    from fastp2phd import inference

    ck, _ = trained
    monkeypatch.setattr(inference, "ONNX_INLINE_BYTES", 0)
    model = inference.load_run(ck / "run")
    for _ in range(2):  # a new export, then one that replaces it
        path, difference = inference.export_onnx(model, tmp_path / "g.onnx")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
        graph = onnx.load(str(path), load_external_data=False).graph
        places = {d.value for t in graph.initializer for d in t.external_data if d.key == "location"}
        assert places == {"g.onnx.data"}
        assert difference is None or difference < 1e-4


def test_export_onnx_never_replaces_a_file_that_is_not_an_onnx_model(trained, tmp_path, capsys):
    ck, data = copy_run(trained, tmp_path)
    g = ck / "run" / "latest_net_G.pth"
    before = g.read_bytes()
    assert main(run_args("export-onnx", ck, data, "--onnx", str(g))) == 1
    one_sentence(capsys, f"{g} exists and is not an ONNX model", "choose another --onnx")
    assert g.read_bytes() == before
    assert main(run_args("export-onnx", ck, data, "--onnx", str(tmp_path))) == 1
    one_sentence(capsys, f"{tmp_path} is a folder")
    assert main(run_args("export-onnx", ck, data)) == 0  # the default file, and again over it
    assert main(run_args("export-onnx", ck, data)) == 0
    assert not [p for p in (ck / "run").iterdir() if p.name.startswith(".")]


def test_a_full_disk_during_an_onnx_export_keeps_the_previous_export(trained, tmp_path, monkeypatch, capsys):
    from support import fill_disk_at_write

    ck, data = trained
    out = tmp_path / "g.onnx"
    assert main(run_args("export-onnx", ck, data, "--onnx", str(out))) == 0
    before = out.read_bytes()
    fill_disk_at_write(monkeypatch, 0)
    capsys.readouterr()
    assert main(run_args("export-onnx", ck, data, "--onnx", str(out))) == 1
    one_sentence(capsys, f"could not write {out}: the disk is full", "previous version of the file, if any, is intact")
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["g.onnx"]


def test_demo_overwrite_replaces_only_the_demo_s_own_files(tmp_path):
    """`edit --checkpoints_dir demo_output/checkpoints` invites runs beside the demo's: --overwrite removed them."""
    from fastp2phd import demo

    out = tmp_path / "demo_output"
    for part in demo.DEMO_PARTS:
        (out / part).mkdir(parents=True)
        (out / part / "x").write_text("demo's")
    (out / "checkpoints" / "mine").mkdir()
    (out / "checkpoints" / "mine" / "latest_net_G.pth").write_text("the user's run")
    (out / "notes.txt").write_text("the user's")
    assert demo._prepare(out, overwrite=True) is None
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "checkpoints", "checkpoints/mine", "checkpoints/mine/latest_net_G.pth", "notes.txt"]


@pytest.mark.parametrize("name", ["features_clustered_002.npz", "features.npz"])
def test_encode_features_never_replaces_clusters_a_user_saved(name, trained, tmp_path, capsys):
    """e.g. the original's features_clustered_010.npy converted with save_clusters, which no rerun gives back."""
    import torch

    from fastp2phd.features import save_clusters

    ck, data = copy_run(trained, tmp_path)
    save_clusters(ck / "run" / name, {26: torch.ones(2, 3)})
    before = {p.name: p.read_bytes() for p in (ck / "run").iterdir() if p.is_file()}
    assert main(run_args("encode-features", ck, data, *TINY)) == 1
    one_sentence(capsys, f"{ck / 'run' / name} holds", "encode-features did not write", "--cluster_path")
    assert {p.name: p.read_bytes() for p in (ck / "run").iterdir() if p.is_file()} == before
    (ck / "run" / name).write_bytes(b"damaged")  # an unreadable one is what a new encoding repairs
    assert main(run_args("encode-features", ck, data, *TINY)) == 0


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 cut", "another width"])
def test_a_damaged_clusters_file_says_to_encode_again_which_then_rewrites_it(damage, trained, tmp_path, capsys):
    import torch

    from fastp2phd.features import save_clusters

    ck, data = copy_run(trained, tmp_path)
    clusters = ck / "run" / "features_clustered_002.npz"
    if isinstance(damage, bytes):
        clusters.write_bytes(damage)
    else:  # an encoding of another run (feat_num 4), as encode-features writes it
        save_clusters(clusters, {26: torch.ones(2, 4)}, {"kind": "clusters"})
    assert main(run_args("test", ck, data, "--results_dir", str(tmp_path / "results"))) == 1
    one_sentence(capsys, str(clusters), "run `fastp2phd encode-features` to write it anew")
    assert main(run_args("encode-features", ck, data)) == 0  # (it read the file it was to replace, and stopped)
    assert main(run_args("test", ck, data, "--results_dir", str(tmp_path / "results"))) == 0


def test_a_checkpoint_of_another_network_or_options_on_resume_is_a_sentence_naming_it(trained, tmp_path, capsys):
    ck, data = copy_run(trained, tmp_path)
    run = ck / "run"
    argv = ["train", "--continue_train", "--name", "run", "--checkpoints_dir", str(ck), "--dataroot", str(data),
            *TINY, *TRAIN]
    wider = list(argv)
    wider[wider.index("--ngf") + 1] = "8"
    assert main(wider) == 1  # the train state, saved with ngf 4
    one_sentence(capsys, f"fastp2phd train: {run / 'latest_train_state.pth'}: ", "saved with ngf=4")
    (run / "latest_train_state.pth").unlink()  # the original code's checkpoints: the networks alone
    shutil.copy(run / "latest_net_G.pth", run / "latest_net_D.pth")
    assert main(argv) == 1
    one_sentence(capsys, f"fastp2phd train: {run / 'latest_net_D.pth'}: ")
    argv = ["train", "--name", "new", "--checkpoints_dir", str(ck), "--dataroot", str(data), *TINY, *TRAIN,
            "--load_pretrain", str(run), "--netG", "local"]
    assert main(argv) == 1  # a G1 of another width than the enhancer's needs
    one_sentence(capsys, f"--load_pretrain {run / 'latest_net_G.pth'}: ")


@pytest.mark.parametrize("command", ["test", "edit"])
def test_a_damaged_saved_scene_s_features_say_what_to_do(command, trained, tmp_path, capsys):
    ck, data = trained
    shutil.copytree(data, tmp_path / "data")
    features = tmp_path / "data" / "test_features" / "scene_00000_gtFine_labelIds.npz"
    features.parent.mkdir()
    features.write_bytes(b"PK\x03\x04 cut short")
    extra = ["--results_dir", str(tmp_path / "results")] if command == "test" else ["--port", "0"]
    assert main(run_args(command, ck, tmp_path / "data", *extra)) == 1
    one_sentence(capsys, str(features), "save the scene again from the editor, or remove the file")
    assert features.read_bytes() == b"PK\x03\x04 cut short"


def test_a_damaged_bench_results_file_is_left_out_of_the_report_with_a_sentence(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from report import write_report

    results = tmp_path / "results"
    results.mkdir()
    row = {"suite": "boundary_map", "case": "1x1x8x8 int32 -> float32", "provider": "fastp2phd", "bytes": 256,
           "images": 1, "peak_mb": 1.0, "median_s": 0.01, "iqr_s": 0.001, "min_s": 0.01, "max_s": 0.01, "rounds": 1}
    run = {"device": "cpu", "device_name": "Test CPU", "cpu_threads": 2, "date": "2026-11-27T10:00Z", "torch": "x",
           "triton": "y", "commit": "abc", "results": [row]}
    (results / "cpu-good.json").write_text(json.dumps(run))
    (results / "cpu-cut.json").write_text(json.dumps(run)[:40])
    report = write_report(results, tmp_path / "REPORT.md").read_text()
    assert "run `cpu-good.json`" in report and "cpu-cut.json" not in report
    assert f"report: {results / 'cpu-cut.json'} is not a bench results file" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # (written through a temporary)


@pytest.mark.parametrize("failing", [0, 3, 4])  # the first image, the last one, the page
def test_a_full_disk_while_test_writes_keeps_the_earlier_results_and_says_so(failing, trained, tmp_path, monkeypatch,
                                                                              capsys):
    from support import fill_disk_at_write

    ck, data = trained
    argv = run_args("test", ck, data, "--results_dir", str(tmp_path / "results"))
    assert main(argv) == 0
    web = tmp_path / "results" / "run" / "test_latest"
    before = {p: p.read_bytes() for p in web.rglob("*") if p.is_file()}
    fill_disk_at_write(monkeypatch, failing)
    capsys.readouterr()
    assert main(argv) == 1
    one_sentence(capsys, "fastp2phd test: could not write", "the disk is full", "is intact")
    assert {p: p.read_bytes() for p in web.rglob("*") if p.is_file()} == before


def test_a_log_line_cut_by_a_kill_does_not_swallow_the_next_one(tmp_path):
    import json

    from fastp2phd.files import append_text

    log = tmp_path / "loss_log.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 1, "epo')  # the append a kill (or a full disk) cut short
    append_text(log, json.dumps({"epoch": 2}) + "\n")
    append_text(log, json.dumps({"epoch": 3}) + "\n")
    assert log.read_text().splitlines()[-2:] == ['{"epoch": 2}', '{"epoch": 3}']
    append_text(tmp_path / "new.txt", "a\n")
    assert (tmp_path / "new.txt").read_text() == "a\n"
