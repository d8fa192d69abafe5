"""Training in several processes (gloo on the CPU): two processes train as one with twice the batch, a
stopped run resumes exactly (and in another number of processes), a failure in one process ends them all in
sentences, a killed torchrun takes its processes with it, and what one process must run alone is refused.
(test_workflow.py has the first two-process run, the logged means and the sampler.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastp2phd.cli import main
from fastp2phd.files import load_torch
from test_workflow import (ROOT, FEATURES, _assert_equal, _Stop, _trainer, bad_label_folder,  # noqa: F401
                           cli_slowed, dataroot, train_args)  # (dataroot: the fixture)


def _train_in_process(rank: int, store: str, argv: list[str], stop_at: int | None) -> None:
    """One of two training processes (as torchrun starts them); ``stop_at``: stop, as if killed, once that
    many images are done (after the save that step made, if any). A run to its end leaves the losses
    ``train`` returned in ``<store>.<rank>``."""
    import torch.distributed as dist

    from fastp2phd.cli import build_parser
    from fastp2phd.options import finish_options, train_spec
    from fastp2phd.training import Trainer, train  # (before the group exists, as `fastp2phd train` imports it)

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dist.barrier()  # (the workers have started, and named themselves)
    workers = _gloo_workers()
    spec = train_spec(finish_options(build_parser().parse_args(argv), is_train=True))
    if stop_at is None:
        losses = train(spec, torch.device("cpu"))  # (train ends the process group)
        torch.save({"losses": losses, "workers": workers, "left": workers & _gloo_workers()}, f"{store}.{rank}")
        return

    class Stopping(Trainer):
        def update(self, batch):
            if self.position.total_steps == stop_at:
                raise _Stop
            return super().update(batch)

    try:
        Stopping(spec, torch.device("cpu")).run()
    except _Stop:
        pass
    finally:
        dist.destroy_process_group()


def _gloo_workers() -> set[int]:
    """The ids of the threads named as gloo names its workers (Linux; an empty set elsewhere). Called right after
    the group starts, these are its workers (OpenMP threads a worker starts later take its name)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return set()
    return {int(task.name) for task in tasks.iterdir() if _thread_name(task) == "pt_gloo_runloop"}


def _thread_name(task: Path) -> str | None:
    """A thread's name; None for one that ended since its folder was listed."""
    try:
        return (task / "comm").read_text().strip()
    except FileNotFoundError:
        return None


def _two_processes(tmp_path, argv, stop_at=None) -> list[dict[str, float]] | None:
    """Train in two processes; a run to its end returns the losses ``train`` returned in each. Each process
    ends with none of the process group's worker threads left: the group ends with ``train``, not as the
    interpreter shuts down (see fastp2phd/collectives.py; torch.distributed.nn.functional, first imported by
    DDP while the group existed, kept the group)."""
    store = tmp_path / f"store{len(list(tmp_path.glob('store*')))}"  # a fresh rendezvous file for each group
    torch.multiprocessing.spawn(_train_in_process, args=(str(store), [str(a) for a in argv], stop_at), nprocs=2)
    if stop_at is not None:
        return None
    ends = [torch.load(f"{store}.{rank}") for rank in range(2)]
    for end in ends:
        assert end["workers"] and not end["left"], end  # (the group had workers on Linux; none is left)
    return [end["losses"] for end in ends]


def test_two_processes_train_as_one_with_twice_the_batch(tmp_path, dataroot):
    """Two processes at --batchSize 1 train as one at --batchSize 2 (losses are means, DDP averages gradients;
    norms are per image): the same logged losses and weights, E's included, within float rounding. (But for
    the biases of convolutions before an instance norm: their gradient is zero up to rounding, which Adam
    scales to whole steps of --lr.)"""
    args = ["--niter", "1", "--niter_decay", "0", "--print_freq", "1", *FEATURES]
    _two_processes(tmp_path, train_args(tmp_path / "two", dataroot, *args, "--batchSize", "1"))
    assert main([str(a) for a in train_args(tmp_path / "one", dataroot, *args, "--batchSize", "2")]) == 0
    logs = [[json.loads(line) for line in (tmp_path / run / "run" / "loss_log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert [row["total_steps"] for row in logs[0]] == [row["total_steps"] for row in logs[1]] == [2, 4, 6]
    for one, two in zip(*logs):
        for name in ("G_GAN", "G_GAN_Feat", "D_real", "D_fake"):
            assert two[name] == pytest.approx(one[name], rel=1e-5), (name, one["total_steps"])
    for net in "GDE":
        one, two = (load_torch(tmp_path / run / "run" / f"latest_net_{net}.pth") for run in ("one", "two"))
        for key in one:
            if not key.endswith("bias"):
                assert torch.allclose(one[key], two[key], rtol=0, atol=1e-5), (net, key)


def test_two_processes_resume_exactly(tmp_path, dataroot):
    """Two processes stopped in the second epoch and continued with --continue_train end with the state of
    the two-process run done in one go: weights, optimisers, every process's image pool, the class counts.
    Batches of 2 from 3 images a process: a full and a short batch each epoch."""
    args = ["--niter", "1", "--niter_decay", "1", "--pool_size", "2", "--save_latest_freq", "4", *FEATURES]
    losses = _two_processes(tmp_path, train_args(tmp_path / "a", dataroot, *args))
    # (No step logged at --print_freq 100:) what train returns is the mean over the processes too.
    assert losses[0] == losses[1] and set(losses[0]) == {"G_GAN", "G_GAN_Feat", "G_VGG", "D_real", "D_fake"}
    _two_processes(tmp_path, train_args(tmp_path / "b", dataroot, *args), stop_at=10)
    state = load_torch(tmp_path / "b" / "run" / "latest_train_state.pth")
    assert (state["epoch"], state["epoch_iter"]) == (2, 4)  # the save at 8 images: in the middle of epoch 2
    _two_processes(tmp_path, train_args(tmp_path / "b", dataroot, *args, "--continue_train"))
    a, b = (load_torch(tmp_path / run / "run" / "latest_train_state.pth") for run in "ab")
    a.pop("torch_rng"), b.pop("torch_rng")  # (each pass over the data draws a loader seed; no step draws)
    _assert_equal(a, b)
    # Each process's pool draws its own choices (the same draws in both made one choice for the whole batch).
    assert a["pools"][0]["rng"] != a["pools"][1]["rng"]
    # Each pixel of the two epochs counted once, however many saves summed the processes' counts.
    counts = [json.loads((tmp_path / run / "run" / "classes.json").read_text())["pixels"] for run in "ab"]
    assert counts[0] == counts[1] and sum(counts[0]) == 2 * 6 * 32 * 64


def test_a_one_process_run_continues_in_two(tmp_path, dataroot, capfd):
    """A run saved by one process in the middle of epoch 1 goes on in two: a note says so, and the two take
    the epoch's images not yet trained on (4 of 6 done: one each), then whole epochs."""
    stopped = _trainer(tmp_path, dataroot, stop_at=4)  # (two epochs, features, pools of 2, batches of 2)
    with pytest.raises(_Stop):
        stopped.run()
    stopped.save("latest")
    capfd.readouterr()
    _two_processes(tmp_path, train_args(tmp_path, dataroot, "--niter", "1", "--niter_decay", "1", "--pool_size", "2",
                                        *FEATURES, "--continue_train"))
    out = capfd.readouterr().out
    assert out.count("note: resuming a run of 1 process(es) with 2: the data order of the current epoch changes, "
                     "and the image pools start empty\n") == 1, out
    state = load_torch(tmp_path / "run" / "latest_train_state.pth")
    assert (state["epoch"], state["epoch_iter"], state["total_steps"], state["world"]) == (3, 0, 12, 2)
    assert [len(pool["images"]) for pool in state["pools"]] == [2, 2]
    assert sum(json.loads((tmp_path / "run" / "classes.json").read_text())["pixels"]) == 2 * 6 * 32 * 64


def _collectives_in_process(rank: int, store: str) -> None:
    import torch.distributed as dist

    from fastp2phd.collectives import gather_objects, mean_over_processes, sum_over_processes

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        counts = torch.tensor([1, 2, 3]) * (rank + 1)
        mine = {"rank": rank, "images": torch.full((rank + 1, 2), float(rank)), "text": "x" * 1000 * rank}
        result = {"gathered": gather_objects(mine, torch.device("cpu")),
                  "sum": sum_over_processes(counts, torch.device("cpu")), "counts": counts,
                  "mean": mean_over_processes({"b": 1.0 + rank, "a": -2.0 * rank}, torch.device("cpu"))}
    finally:
        dist.destroy_process_group()
    torch.save(result, f"{store}.{rank}")


def test_the_trainers_collectives(tmp_path):
    """What the trainer gathers and sums over processes (pools, class counts, logged losses): every process's
    object in rank order whatever its size, the sum in a new tensor, means with the names in order."""
    store = tmp_path / "store"
    torch.multiprocessing.spawn(_collectives_in_process, args=(str(store),), nprocs=2)
    for rank in range(2):
        result = torch.load(f"{store}.{rank}")
        assert [part["rank"] for part in result["gathered"]] == [0, 1]
        for other, part in enumerate(result["gathered"]):
            assert torch.equal(part["images"], torch.full((other + 1, 2), float(other)))
            assert part["text"] == "x" * 1000 * other
        assert torch.equal(result["sum"], torch.tensor([3, 6, 9]))
        assert torch.equal(result["counts"], torch.tensor([1, 2, 3]) * (rank + 1))  # (not summed in place)
        assert list(result["mean"].items()) == [("b", 1.5), ("a", -1.0)]


def test_more_processes_than_gpus_is_one_sentence(tmp_path, dataroot, monkeypatch):
    from fastp2phd.cli import build_parser
    from fastp2phd.options import finish_options, train_spec
    from fastp2phd.training import Trainer, TrainingError

    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = [str(a) for a in train_args(tmp_path, dataroot)]
    spec = train_spec(finish_options(build_parser().parse_args(argv), is_train=True))
    with pytest.raises(TrainingError, match=r"^torchrun started 2 processes on this machine, which has 1 GPU\(s\): "
                                            r"give --nproc_per_node at most that \(one GPU each\)$"):
        Trainer(spec, torch.device("cuda"))


def torchrun_command(*argv, port: int, program=("-m", "fastp2phd")) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            *map(str, program), *map(str, argv)]


def torchrun(*argv, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*argv, port=port), capture_output=True, text=True, cwd=ROOT, timeout=300)


def _processes_naming(text: str) -> list[int]:
    """The processes whose command line holds ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError):  # (gone meanwhile)
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="finds the training processes in /proc")
def test_a_killed_torchrun_takes_its_processes_with_it(tmp_path, dataroot):
    """torchrun killed with SIGKILL (as the OOM killer does) cannot stop its processes, which run in sessions of
    their own: they trained on and kept saving into the run folder that a --continue_train would use next."""
    ck = tmp_path / "ck"
    argv = train_args(ck, dataroot, "--niter", "1000", "--niter_decay", "0", "--save_latest_freq", "2")
    with open(tmp_path / "out.txt", "w") as out:
        agent = subprocess.Popen(torchrun_command(*argv, port=29549), stdout=out, stderr=out, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and not (ck / "run" / "latest_train_state.pth").is_file():
        time.sleep(0.2)
    agent.kill()
    agent.wait()
    deadline = time.time() + 30
    while (left := _processes_naming(str(ck))) and time.time() < deadline:
        time.sleep(0.2)
    for pid in left:  # (the test's own training processes: end them before failing)
        os.kill(pid, signal.SIGKILL)
    assert not left
    output = (tmp_path / "out.txt").read_text()
    said = [line for line in output.splitlines() if line.startswith("fastp2phd train: ")]
    # The first to notice stops; the other notices too, or finds it gone first (in a collective).
    assert len(said) == 2 and "torchrun has stopped, so process" in said[0], output
    assert "Traceback" not in output, output


def test_processes_agree_on_the_step_to_stop_after():
    """The first signal received decides: the step two past that process's own, whichever process is a step ahead."""
    import torch.distributed as dist

    from fastp2phd.stopping import StopAgreement

    store = dist.HashStore()
    ahead, behind = StopAgreement(store, "stop"), StopAgreement(store, "stop")
    assert ahead.after_step(None) is None and ahead.after_step(None) is None
    assert ahead.after_step(signal.SIGTERM) is None  # step 3: stop after step 5
    stops = {"ahead": [ahead.after_step(None), ahead.after_step(None)]}
    stops["behind"] = [behind.after_step(None), behind.after_step(signal.SIGINT)]  # (too late to decide)
    stops["behind"] += [behind.after_step(None) for _ in range(3)]
    assert stops == {"ahead": [None, signal.SIGTERM], "behind": [None, None, None, None, signal.SIGTERM]}


def test_a_stop_signal_to_torchrun_stops_every_process_after_one_saved_step(tmp_path, dataroot):
    """A scheduler's SIGTERM (or Ctrl-C) reaches torchrun, which passes SIGTERM on to its processes' groups, loader
    workers included, and kills them 30 s later: they agree on a step, save it (test_two_processes_resume_exactly
    resumes such a save) and stop, saying so once. Slurm signals every process of the job, so each gets two
    SIGTERMs (the second stopped it at once, unsaved). The run is bound by its data loading: each process waits on
    its workers for the next batch (a worker the signal ended broke it, with a traceback in each process)."""
    ck = tmp_path / "ck"
    argv = [*map(str, train_args(ck, dataroot, "--niter", "1000", "--niter_decay", "0", "--batchSize", "1"))]
    argv[argv.index("--nThreads") + 1] = "2"
    script = tmp_path / "train_slowly.py"
    script.write_text(cli_slowed("loading"))
    agent = subprocess.Popen(torchrun_command(*argv, port=29543, program=[script]), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert agent.stdout.readline().startswith("training run:")
        time.sleep(3)  # (some steps in)
        for pid in _processes_naming(str(ck)):  # as Slurm signals a job: every process, torchrun's agent included
            os.kill(pid, signal.SIGTERM)
        out, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
    said = [line for line in err.splitlines() if line.startswith("fastp2phd train: ")]
    assert len(said) == 1 and said[0].startswith("fastp2phd train: stopped by SIGTERM at epoch "), err
    assert not any(line.startswith("[rank") for line in err.splitlines()), err  # (a process's traceback)
    assert "SIGTERM: stopping after a step every process agrees on" in out, out
    state = load_torch(ck / "run" / "latest_train_state.pth")
    assert f", total steps {state['total_steps']}, and saved" in said[0], said  # (an epoch's end saves as the next's)
    assert len(state["pools"]) == 2  # (both processes took part in the save)


def test_bad_data_in_one_process_ends_all_in_sentences(tmp_path, dataroot):
    """Scene 1's label map is bad, and only process 1 reads it (--serial_batches): it says why it stopped,
    process 0, whose collective then fails, says that it stopped with it, and neither prints a traceback."""
    argv = train_args(tmp_path / "ck", bad_label_folder(tmp_path, dataroot), "--niter", "1", "--niter_decay", "0",
                      "--batchSize", "1", "--serial_batches")
    result = torchrun(*argv, port=29547)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    ours = [line for line in lines if line.startswith("fastp2phd train: ")]
    assert any("contains id 40" in line and "--label_nc" in line for line in ours), result.stderr
    assert not any(line.startswith("[rank") for line in lines), result.stderr  # as "[rank0]: Traceback ..."
    assert "RuntimeError" not in result.stderr and "Connection closed" not in result.stderr, result.stderr


def test_an_error_every_process_hits_is_said_once(tmp_path):
    result = torchrun("train", "--name", "run", "--checkpoints_dir", tmp_path / "ck", "--dataroot", tmp_path / "none",
                      "--device", "cpu", port=29545)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("fastp2phd train: ")]
    assert len(said) == 1 and "does not exist" in said[0] and "--dataroot" in said[0], result.stderr


def test_only_train_runs_under_torchrun(tmp_path, monkeypatch, capsys):
    """Every other command would run once in each process, all writing the same files: refused, in one
    sentence (from the first process)."""
    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert main(["make-synthetic", "--out", str(tmp_path / "scenes"), "--num_train", "1", "--num_test", "1",
                     "--height", "32", "--width", "64"]) == 1
        err = capsys.readouterr().err
        assert err == ("" if rank == "1" else "fastp2phd make-synthetic: it runs in one process, and torchrun started "
                       "2: run it without torchrun (only train uses several processes)\n")
        assert not (tmp_path / "scenes").exists()


def test_cuda_graphs_drop_a_short_last_batch_only_when_a_process_has_a_full_one():
    """Under CUDA graphs a smaller last batch is dropped; 4 processes with 3 images and --batchSize 2 have one
    image each, which was dropped too: they trained on nothing."""
    from types import SimpleNamespace

    from fastp2phd.training import EpochSampler, drops_last_batch

    spec, cuda = SimpleNamespace(compile="reduce-overhead", batchSize=2), torch.device("cuda")
    assert drops_last_batch(spec, cuda, EpochSampler(7, True, 0, rank=0, world=2))  # 4 images: 2 + 2
    assert drops_last_batch(spec, cuda, EpochSampler(3, True, 0))  # 3 images in one process: 2 (+ 1 dropped)
    assert not drops_last_batch(spec, cuda, EpochSampler(3, True, 0, rank=0, world=4))  # 1 image: keep it
    assert not drops_last_batch(spec, torch.device("cpu"), EpochSampler(7, True, 0))
    assert not drops_last_batch(SimpleNamespace(compile="default", batchSize=2), cuda, EpochSampler(7, True, 0))
