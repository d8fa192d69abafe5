"""The memory model: byte counting by hand, fake against real tensors, the estimates' structure, the command."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastp2phd.cli import build_parser, main
from fastp2phd.memory import (GiB, LiveBytes, default_size, estimate_inference, estimate_training_step,
                              inference_bytes_per_pixel, parse_size, smallest_gpu)
from fastp2phd.options import finish_options, train_spec

TINY = ["--ngf", "8", "--n_downsample_global", "2", "--n_blocks_global", "1", "--ndf", "8", "--nef", "4",
        "--n_downsample_E", "2"]


def train_options(*extra: str):
    return train_spec(finish_options(build_parser().parse_args(["train", *TINY, *extra]), is_train=True))


@pytest.mark.parametrize("fake", [True, False], ids=["fake", "real"])
def test_live_bytes_counted_by_hand(fake):
    with FakeTensorMode() if fake else contextlib.nullcontext(), LiveBytes() as tracker:
        tracker.label = "a"
        a = torch.empty(1000)  # 4000 bytes
        tracker.label = "b"
        b = torch.empty(10, dtype=torch.float64)  # 80 bytes
        view = a[:10]  # no new storage
        assert (tracker.live, tracker.peak) == (4080, 4080)
        tracker.label = "c"
        c = a * 2  # 4000 more: the peak, with b alive
        del b
        assert (tracker.live, tracker.peak) == (8000, 8080)
        assert tracker.at_peak == {"a": 4000, "b": 80, "c": 4000}
        del c
        assert tracker.live == 4000 and tracker.by_label == {"a": 4000, "b": 0, "c": 0}
        del view
        assert tracker.live == 4000  # a is still alive


def test_saved_tensors_live_until_backward_frees_the_graph():
    with FakeTensorMode(), LiveBytes() as tracker:
        x = torch.empty(100, requires_grad=True)  # 400
        y = x.exp()  # 400, saved by exp's backward
        loss = y.sum()  # 4
        del y
        assert tracker.live == 804  # exp's graph keeps y
        loss.backward()  # x.grad: 400 (exp's backward writes it, the engine keeps it)
        del loss
        assert tracker.live == 800 and tracker.peak >= 1204


def small_options(*extra: str):
    return train_options("--num_D", "2", "--instance_feat", *extra)


@pytest.mark.parametrize("extra", [(), ("--netG", "local", "--n_blocks_local", "1", "--checkpoint_activations"),
                                   ("--fp16",)], ids=["global", "local, checkpointing", "bf16 autocast"])
def test_fake_estimate_equals_the_same_tracking_on_real_tensors(extra):
    opt = small_options(*extra)
    fake = estimate_training_step(opt, (64, 128), "cpu")
    real = estimate_training_step(opt, (64, 128), "cpu", fake=False)
    assert fake.peak_bytes == real.peak_bytes and fake.peak_during == real.peak_during
    assert fake.at_peak == real.at_peak


@pytest.mark.parametrize("extra", [("--pool_size", "4"), ("--netG", "local", "--niter_fix_global", "1"),
                                   ("--fp16", "--amp_dtype", "fp16"), ("--channels_last",)],
                         ids=["full pool", "after niter_fix_global", "fp16 grad scaler", "channels_last"])
def test_estimate_is_the_peak_of_a_real_training_run(extra, tmp_path, monkeypatch):
    """The largest peak of the steps of a real run (the Trainer's loop, two epochs) is the estimate, plus the
    trainer's count of pixels per class. The estimate was of a second step: with 2 of the 4 pooled images, and
    of the epochs in which only the local enhancer trains; fp16 and channels_last failed on fake tensors."""
    from fastp2phd.data import make_synthetic
    from fastp2phd.train_step import TrainStep
    from fastp2phd.training import Trainer

    data = make_synthetic(tmp_path / "data", num_train=3, num_test=0, height=32, width=64)
    if "--niter_fix_global" in extra:  # (it freezes G1: refused without a trained one to start from)
        import dataclasses

        from fastp2phd.pix2pixhd import Pix2PixHD

        local = train_options(*extra).model
        g1 = Pix2PixHD(dataclasses.replace(local, netG="global", ngf=local.ngf * 2)).netG
        (tmp_path / "global").mkdir()
        torch.save(g1.state_dict(), tmp_path / "global" / "latest_net_G.pth")
        extra = (*extra, "--load_pretrain", str(tmp_path / "global"))
    spec = train_options("--num_D", "2", "--no_vgg_loss", "--loadSize", "64", "--dataroot", str(data),
                         "--checkpoints_dir", str(tmp_path), "--niter", "2", "--niter_decay", "0", "--nThreads", "0",
                         "--no_progress", "--no_html", *extra)
    estimate = estimate_training_step(spec, (32, 64), "cpu")
    tracker, peaks, step = LiveBytes(), [], TrainStep.step

    def tracked_step(self, batch):
        tracker.reset_peak()
        result = step(self, batch)
        peaks.append(tracker.peak)
        return result

    monkeypatch.setattr(TrainStep, "step", tracked_step)
    with tracker:
        Trainer(spec, torch.device("cpu")).run()
    assert len(peaks) == 6 and max(peaks) == estimate.peak_bytes + 8 * spec.model.label_nc


def test_estimate_breakdown_adds_up_and_names_the_parts():
    estimate = estimate_training_step(small_options(), (64, 128))
    assert sum(estimate.at_peak.values()) == estimate.peak_bytes
    params = sum(p.numel() * 4 for p in _networks_of(small_options()))
    assert estimate.at_peak["parameters and buffers"] >= params
    assert estimate.at_peak["optimizer states (Adam)"] >= 2 * params - 4 * 10**6  # exp_avg, exp_avg_sq (G, E, D)
    for part in ("G activations", "E activations"):
        assert estimate.at_peak.get(part, 0) > 0
    assert estimate.flops > 0


def _networks_of(spec):
    from fastp2phd.pix2pixhd import Pix2PixHD, build_discriminator

    return [*Pix2PixHD(spec.model).parameters(), *build_discriminator(spec).parameters()]


def test_checkpointing_and_bf16_lower_the_estimate_at_a_size_where_activations_dominate():
    size = (256, 512)
    plain = estimate_training_step(small_options("--netG", "local"), size).peak_bytes
    checkpointed = estimate_training_step(small_options("--netG", "local", "--checkpoint_activations"), size).peak_bytes
    both = estimate_training_step(small_options("--netG", "local", "--checkpoint_activations", "--fp16"), size).peak_bytes
    assert checkpointed < 0.7 * plain and both < checkpointed


def test_inference_estimate_is_the_generator_alone():
    opt = small_options()
    inference = estimate_inference(opt.model, (64, 128))
    assert set(inference.at_peak) <= {"parameters and buffers", "batch", "G activations",
                                      "inputs (one-hot labels, boundary map)"}
    assert inference.peak_bytes < estimate_training_step(opt, (64, 128)).peak_bytes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_estimate_equals_real_generation_at_its_precision(precision):
    """test --precision bf16 runs autocast: halved activations, plus autocast's bf16 copies of the float32
    weights (the estimate once ran fp32 whatever the precision)."""
    from fastp2phd.memory import _fake_batch
    from fastp2phd.pix2pixhd import Pix2PixHD

    spec = train_options("--n_blocks_global", "2").model
    estimate = estimate_inference(spec, (64, 128), device_type="cpu", precision=precision)
    with LiveBytes() as tracker:
        model = Pix2PixHD(spec).eval()
        batch = _fake_batch(spec, 1, (64, 128), random=True)
        model.inference(batch["label"], batch["inst"], precision=precision)
    assert estimate.peak_bytes == tracker.peak
    assert estimate.config["precision"] == {"fp32": "fp32", "bf16": "bf16 autocast"}[precision]


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_low_precision_inference_keeps_no_cast_copy_of_every_weight(device_type):
    """Inference uses each weight once: autocast's cache kept a bf16 copy of every weight to the end, so bf16
    inference of the 512p generator needed 1.5x fp32's memory at small sizes (1.38 GiB against 1.02 at 512x1024 on
    the CPU). Now at most one layer's cast weight is alive beyond fp32's peak."""
    from fastp2phd.pix2pixhd import Pix2PixHD
    from fastp2phd.specs import ModelSpec

    spec = ModelSpec()
    with FakeTensorMode():
        largest = max(p.numel() for p in Pix2PixHD(spec).parameters())
    fp32, bf16 = (estimate_inference(spec, (64, 128), device_type=device_type, precision=p).peak_bytes
                  for p in ("fp32", "bf16"))
    assert bf16 <= fp32 + 2 * largest


def test_the_cuda_model_casts_as_cuda_autocast_does():
    """The estimate of a CUDA step runs CPU autocast on CPU fake tensors: each op pix2pixHD runs must give there
    the dtype CUDA's autocast gives (fake CUDA tensors, which need no GPU). CPU autocast pads in float32, which
    overestimated bf16 inference by 16-21% and 1024p --fp16 training by 11%."""
    import torch.nn.functional as F

    from fastp2phd.memory import autocast_rules_of

    def dtypes(device):
        x, w = torch.empty(1, 2, 8, 8, dtype=torch.bfloat16, device=device), torch.empty(2, 2, 3, 3, device=device)
        y = torch.empty(1, 2, 8, 8, device=device)
        outputs = [F.pad(x, (1, 1, 1, 1), mode="reflect"), F.pad(x, (1, 1, 1, 1), mode="replicate"), F.pad(x, (1,) * 4),
                   F.conv2d(y, w), F.conv_transpose2d(y, w), F.instance_norm(x), F.batch_norm(x, None, None, training=True),
                   F.relu(x), F.leaky_relu(x, 0.2), torch.tanh(x), torch.sigmoid(x), F.avg_pool2d(x, 3, 2, 1),
                   F.max_pool2d(x, 2), torch.cat([x, y], 1), F.l1_loss(x, y), F.mse_loss(x, x), x.pow(2), (x - y).abs(),
                   F.binary_cross_entropy_with_logits(x, x), x.mean()]
        return [t.dtype for t in outputs]

    with FakeTensorMode():
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.set_autocast_enabled("cuda", True)  # (torch.autocast("cuda") turns itself off without CUDA)
        try:
            cuda = dtypes("cuda")
        finally:
            torch.set_autocast_enabled("cuda", False)
        with autocast_rules_of("cuda"), torch.autocast("cpu", dtype=torch.bfloat16):
            modelled = dtypes("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert dtypes("cpu")[0] == torch.float32  # CPU's own rules again after the block
    assert modelled == cuda
    # bf16 about halves what a pixel needs (54% here: the image handed out is float32); CPU's rules give more than fp32.
    spec = train_options().model
    assert inference_bytes_per_pixel(spec, "cuda", "bf16") < 0.6 * inference_bytes_per_pixel(spec, "cuda")
    assert inference_bytes_per_pixel(spec, "cpu", "bf16") > inference_bytes_per_pixel(spec, "cuda")


def test_inference_fp16_is_estimated_as_test_runs_it(capsys):
    def peak(*argv):
        assert main(["memory", *TINY, "--size", "64x128", "--inference", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    fp32, bf16, fp16 = peak(), peak("--precision", "bf16"), peak("--precision", "fp16")
    assert fp16["config"]["precision"] == "fp16 autocast"
    assert fp16["peak_bytes"] == bf16["peak_bytes"] != fp32["peak_bytes"]
    # --fp16 trains in mixed precision; test runs --precision (fp32 by default) and says so, as the estimate does.
    with_fp16 = peak("--fp16")
    assert with_fp16["peak_bytes"] == fp32["peak_bytes"] and with_fp16["config"]["precision"] == "fp32"
    assert with_fp16["notes"] == ["--fp16 is a training option; inference runs in --precision fp32 (use --precision "
                                  "bf16 or fp16)"]


def test_inference_of_a_run_trained_on_crops_is_estimated_on_whole_scenes(capsys):
    """test reads whole scenes of a run trained on crops (the estimate was of a crop: 1/32 of the pixels), one
    at a time."""
    assert main(["memory", *TINY, "--inference", "--resize_or_crop", "crop", "--fineSize", "256", "--batchSize", "2",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["config"]["height"], data["config"]["width"]) == (1024, 2048)
    assert "test reads a run trained on crops whole (--resize_or_crop none)" in data["notes"][0]
    assert data["notes"][1] == "test generates one image at a time; this is 2 at once (--batchSize)"
    assert main(["memory", *TINY, "--resize_or_crop", "crop", "--fineSize", "256", "--json"]) == 0  # training: crops
    assert json.loads(capsys.readouterr().out)["config"]["height"] == 256


def test_default_size_follows_the_resize_options():
    def size(*extra):
        spec = train_options(*extra)
        return default_size(spec.data, spec.model)

    assert size("--resize_or_crop", "none") == (1024, 2048)
    assert size("--loadSize", "1024") == (512, 1024)  # scale_width
    assert size("--resize_or_crop", "crop", "--fineSize", "300") == (300, 300)
    assert size("--netG", "local", "--resize_or_crop", "crop", "--fineSize", "300") == (296, 296)
    # Scaled to 512x256, no side is larger than the crop: the loader does not crop (it was estimated at 512x512).
    assert size("--resize_or_crop", "scale_width_and_crop", "--loadSize", "512", "--fineSize", "512") == (256, 512)
    assert size("--resize_or_crop", "resize_and_crop", "--loadSize", "512", "--fineSize", "256") == (256, 256)
    assert parse_size("512x1024") == (512, 1024)
    with pytest.raises(ValueError, match="is not HEIGHTxWIDTH; write it like 1024x2048"):
        parse_size("512*1024")


def test_smallest_gpu_allows_for_context_and_slack():
    assert smallest_gpu(5 * GiB) == 8
    assert smallest_gpu(7 * GiB) == 12  # 7 * 1.1 + 0.5 > 8
    assert smallest_gpu(100 * GiB) is None


def test_memory_command_prints_json_and_text(capsys):
    assert main(["memory", *TINY, "--size", "64x128", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["what"] == "training step" and data["config"]["height"] == 64 and data["peak_bytes"] > 0
    assert data["fits_gpu_gb"] == 8 and data["measured_bytes"] is None
    assert main(["memory", *TINY, "--size", "64x128", "--inference"]) == 0
    assert "inference of global G (ngf 8) at 64x128" in capsys.readouterr().out


def test_memory_command_says_which_epochs_niter_fix_global_estimates(capsys):
    assert main(["memory", *TINY, "--netG", "local", "--niter_fix_global", "2", "--size", "64x128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [
        "with --niter_fix_global: the peak of the epochs after it, which train all of G (the first ones need less)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_measure_without_cuda_says_so_and_still_prints_the_estimate(capsys):
    assert main(["memory", *TINY, "--size", "64x128", "--measure"]) == 1
    captured = capsys.readouterr()
    assert "estimated peak" in captured.out
    assert "--measure needs a CUDA device, and this machine has none" in captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_inference_precision_auto_without_a_gpu_is_refused(capsys):
    """auto is what the GPU modelled supports, which a machine without one cannot tell."""
    assert main(["memory", *TINY, "--size", "64x128", "--inference", "--precision", "auto"]) == 1
    assert "--precision auto is bf16 or fp32 by the GPU, and this machine has none" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--size", "62x128"], "size 62x128 is not a multiple of 4, which this generator needs"),
    (["--size", "4x128"], "size 4x128 is smaller than the 8x8 this generator needs"),
    (["--size", "0x128"], "size 0x128 is smaller than the 8x8 this generator needs"),  # not "not a multiple of 4"
    (["--size=-8x128"], "is not HEIGHTxWIDTH"),
    (["--niter_fix_global", "2"], "niter_fix_global trains only the local enhancer: it needs netG local"),
    (["--size", "big"], "is not HEIGHTxWIDTH"),
    # Options the estimate cannot follow: refused, not ignored.
    (["--compile"], "the memory model runs the networks eagerly: estimate without --compile"),
    (["--precision", "bf16"], "--precision bf16 is inference's (with --inference); a training step's precision is "
                              "--fp16"),
    (["--inference", "--device", "cpu", "--precision", "fp16"], "fp16 inference needs a CUDA device"),
])
def test_memory_command_bad_options_get_one_sentence(argv, message, capsys):
    assert main(["memory", *TINY, *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_memory_command_rejects_an_unknown_generator(capsys):
    with pytest.raises(SystemExit):
        main(["memory", "--netG", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_checkpointed_instance_norm_act_frees_what_it_recomputed(impl):
    """After backward through checkpointed IN+act layers only the leaf and the output are alive (a C++
    autograd Function that saved its own outputs once kept one tensor per layer alive here)."""
    from torch.utils.checkpoint import checkpoint

    from fastp2phd import ops
    def layer(x):
        return ops.instance_norm_act(x * 2, impl=impl)

    tracker = LiveBytes()
    leaf = torch.randn(1, 4, 64, 64, requires_grad=True)
    with tracker:
        out = leaf * 1
        for _ in range(5):
            out = checkpoint(layer, out, use_reentrant=False)
        out.sum().backward()
    assert tracker.live == out.untyped_storage().nbytes() + leaf.grad.untyped_storage().nbytes()
