"""--compile: the networks compile without graph breaks, a compiled training step equals the eager one, and
what cannot be compiled (no working compiler, a new size under CUDA graphs) says so in one sentence."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

from fastp2phd.compiling import CompileError, OneSize, compile_networks
from fastp2phd.models import Encoder, GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator, VGGLoss
from fastp2phd.models.vgg import Vgg19
from fastp2phd.pix2pixhd import Pix2PixHD
from fastp2phd.specs import ModelSpec
from test_train_step import TINY, batch

pytestmark = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile needs a newer torch")


def instances(n=1, h=32, w=64):
    return torch.randint(0, 3, (n, 1, h, w), generator=torch.Generator().manual_seed(1)) * 1000 + 26000


def networks():
    torch.manual_seed(0)
    spec = ModelSpec(ngf=4, n_downsample_global=2, n_blocks_global=1, nef=4, n_downsample_E=2, instance_feat=True)
    model = Pix2PixHD(spec)
    label = torch.randint(0, 35, (1, 1, 32, 64))
    image = torch.randn(1, 3, 32, 64)
    return {
        "GlobalGenerator": (GlobalGenerator(8, 3, ngf=4, n_downsampling=2, n_blocks=1), (torch.randn(1, 8, 32, 64),)),
        "LocalEnhancer, checkpointed": (
            LocalEnhancer(8, 3, ngf=4, n_downsample_global=2, n_blocks_global=1, n_local_enhancers=1,
                          n_blocks_local=1, checkpoint=True), (torch.randn(1, 8, 64, 128),)),
        "Encoder": (Encoder(3, 3, ngf=4, n_downsampling=2), (image, instances())),
        "MultiscaleDiscriminator": (MultiscaleDiscriminator(6, ndf=4, n_layers=2, num_D=2), (torch.randn(2, 6, 32, 64),)),
        "Pix2PixHD with features": (model, (model.encode_input(label, instances()), instances(), label, image)),
        # (the generated image requires grad: VGG's layers then keep what backward needs)
        "VGGLoss": (VGGLoss(vgg=Vgg19(pretrained=False)), (torch.rand(1, 3, 32, 64, requires_grad=True),
                                                           torch.rand(1, 3, 32, 64))),
        "VGGLoss, checkpointed": (VGGLoss(vgg=Vgg19(pretrained=False), checkpoint=True),
                                  (torch.rand(1, 3, 32, 64, requires_grad=True), torch.rand(1, 3, 32, 64))),
    }


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("name", list(networks()))
def test_networks_compile_whole_with_no_graph_break(name, autocast):
    torch._dynamo.reset()
    module, inputs = networks()[name]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explanation = torch._dynamo.explain(module)(*inputs)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def train_step(compile_mode: str):
    """A TrainStep of a tiny model with features and a checkpointed VGG loss on the CPU, its weights from a fixed
    seed."""
    from fastp2phd.cli import build_parser
    from fastp2phd.options import finish_options, train_spec
    from fastp2phd.train_step import TrainStep

    torch._dynamo.reset()
    argv = ["train", "--resize_or_crop", "none", *TINY, "--instance_feat", "--checkpoint_activations",
            "--compile", compile_mode]
    spec = train_spec(finish_options(build_parser().parse_args(argv), is_train=True))
    torch.manual_seed(0)
    return TrainStep(spec, torch.device("cpu"), vgg=Vgg19(pretrained=False))


@contextlib.contextmanager
def cuda_graph_checks(monkeypatch):
    """Inductor's reasons not to record a compiled graph in a CUDA graph, checked on the CPU (where they stop at
    "cpu device", left out here): yields a list that gets (forward or backward, CUDA graphs on, the lowering's
    reason, the other reasons) per graph compiled inside; None where this torch's Inductor checks elsewhere."""
    cudagraph_utils = pytest.importorskip("torch._inductor.cudagraph_utils")
    output_code = pytest.importorskip("torch._inductor.output_code")
    compiled_graph = getattr(output_code, "CompiledFxGraph", None)
    if not all(hasattr(m, n) for m, n in ((cudagraph_utils, "check_lowering_disable_cudagraph"),
                                          (output_code, "cudagraph_post_compile"), (compiled_graph, "post_compile"))):
        yield None
        return
    graphs = []
    post_compile = compiled_graph.post_compile

    def checked_post_compile(self, example_inputs, constants, graph_kwargs):
        info = self.cudagraph_info
        graphs.append(("backward" if graph_kwargs.get("is_backward") else "forward", bool(graph_kwargs["cudagraphs"]),
                       self.disabled_cudagraphs_reason, None if info is None else info.cudagraph_fail_reasons))
        return post_compile(self, example_inputs, constants, graph_kwargs)

    monkeypatch.setattr(cudagraph_utils, "check_lowering_disable_cudagraph", lambda devices: None)
    monkeypatch.setattr(output_code, "cudagraph_post_compile", lambda *args: None)  # (no graphs on the CPU)
    monkeypatch.setattr(compiled_graph, "post_compile", checked_post_compile)
    # Partitions skip some checks; a cached graph keeps its old reasons; and every mutated input (but the weights)
    # is a reason now, where on a GPU CUDA graph trees check some as they run.
    with torch._inductor.config.patch({"graph_partition": False, "fx_graph_cache": False,
                                       "triton.cudagraph_support_input_mutation": False}):
        yield graphs


def test_a_compiled_training_step_matches_the_eager_one_and_qualifies_for_cuda_graphs(monkeypatch):
    """Each of three steps starts the compiled and the eager step from the same state (a copy: loading shares the
    optimiser's tensors), and both give the same losses and, from the second step on, the same weights. Adam's
    first update is lr * g / (|g| + eps), about lr * sign(g), so a weight whose gradient is rounding noise moves
    2 lr apart (0.2% of G's here): chained, such ulp-level differences between compiled and eager kernels grew to
    1.4e-4 of a loss by the third step for some seeds. Later updates scale a gradient by its running size, so a
    weight whose gradient is near 0 still moves up to about lr apart: every weight within 2 lr, and all but 1 in
    10^3 to rounding (with pix2pixHD's initialisation, 11 of G's 68904 moved 1.4e-5 to 2.8e-5 apart).

    On a GPU, reduce-overhead records each compiled forward and backward in a CUDA graph, unless Inductor finds a
    reason not to (an input mutated, an op a CUDA graph cannot hold, an unbacked size): it then runs that graph
    without one, with a log line, and the step loses the speed it was compiled for. No graph has a reason."""
    with cuda_graph_checks(monkeypatch) as graphs:
        compiled, eager = train_step("reduce-overhead"), train_step("off")
        assert compiled.model.netG._compiled_call_impl is not None and eager.model.netG._compiled_call_impl is None
        for i in range(3):
            compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
            c, e = compiled.step(batch(seed=1 + i))[0], eager.step(batch(seed=1 + i))[0]
            assert c.keys() == e.keys() and all(c[k] == pytest.approx(e[k], rel=1e-5, abs=1e-6) for k in c), (i, c, e)
            # The same update: the compiled networks keep their state_dict keys and hold the same weights.
            for net_c, net_e in ((compiled.model, eager.model), (compiled.netD, eager.netD)):
                sd_c, sd_e = net_c.state_dict(), net_e.state_dict()
                assert sd_c.keys() == sd_e.keys()
                if i > 0:
                    pairs = [(sd_c[k], sd_e[k]) for k in sd_c if sd_c[k].dim() > 1]
                    assert all(torch.allclose(x, y, rtol=0, atol=2 * 2e-4) for x, y in pairs)
                    outside = sum((~torch.isclose(x, y, rtol=1e-4, atol=1e-5)).sum().item() for x, y in pairs)
                    assert outside <= sum(x.numel() for x, _ in pairs) // 1000, outside
    if graphs is not None:
        # G with E, D for D's loss, D frozen for G's, the VGG loss: each forward, and its backward.
        assert sum(kind == "forward" for kind, *_ in graphs) >= 4, graphs
        assert sum(kind == "backward" for kind, *_ in graphs) >= 3, graphs
        assert all(graph == (graph[0], True, None, []) for graph in graphs), graphs


def test_without_a_working_compiler_it_warns_once_and_stays_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    net = GlobalGenerator(8, 3, ngf=4, n_downsampling=2, n_blocks=1)
    with pytest.warns(UserWarning, match=r"--compile default: torch.compile does not work here \(RuntimeError: no C\+\+ "
                                         r"compiler found\); training runs eagerly"):
        assert compile_networks([net, None], "default", torch.device("cpu")) is False
    assert net._compiled_call_impl is None


def test_inference_compiles_with_the_weights_frozen_in_and_follows_a_change_of_weights():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = GlobalGenerator(8, 3, ngf=4, n_downsampling=2, n_blocks=1).eval()
    eager = copy.deepcopy(net)
    x = torch.randn(1, 8, 32, 64)
    assert compile_networks([net], "default", torch.device("cpu"), what="inference", freeze=True)
    with torch.no_grad():
        torch.testing.assert_close(net(x), eager(x))
    if torch.backends.mkldnn.is_available():  # frozen: the convolutions' weights were prepacked as constants
        assert counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] > 0
    # Frozen code must not keep the old weights (without the check it returns a mix of old and new).
    halved = {k: v * 0.5 for k, v in eager.state_dict().items()}
    net.load_state_dict(halved)
    eager.load_state_dict(halved)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), eager(x))
    with torch.no_grad():
        for p in (*net.parameters(), *eager.parameters()):
            p.add_(0.01)
        torch.testing.assert_close(net(x), eager(x))
    # With autograd nothing is frozen: the gradient reaches the weights.
    net(x).square().mean().backward()
    eager(x).square().mean().backward()
    for p, q in zip(net.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_off_compiles_nothing_and_a_bad_mode_is_refused():
    net = GlobalGenerator(8, 3, ngf=4, n_downsampling=2, n_blocks=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compile_networks([net], "off", torch.device("cpu")) is False
    with pytest.raises(CompileError, match="--compile must be one of off, default, reduce-overhead, max-autotune"):
        compile_networks([net], "fastest", torch.device("cpu"))


def test_cuda_graphs_refuse_a_second_image_size():
    guard = OneSize("reduce-overhead", torch.device("cuda"), compiled=True)
    guard.check(torch.zeros(1, 3, 256, 512, device="meta"))
    guard.check(torch.zeros(1, 3, 256, 512, device="meta"))
    with pytest.raises(CompileError, match=r"records CUDA graphs for one input size, 1x256x512, but this batch is "
                                           r"1x240x512: give every image one size"):
        guard.check(torch.zeros(1, 3, 240, 512, device="meta"))
    for mode, device, compiled in (("default", "cuda", True), ("reduce-overhead", "cpu", True),
                                   ("reduce-overhead", "cuda", False)):
        free = OneSize(mode, torch.device(device), compiled)
        free.check(torch.zeros(1, 3, 8, 8, device="meta"))
        free.check(torch.zeros(1, 3, 16, 8, device="meta"))  # no graphs to protect: any size


def test_the_command_line_takes_the_modes(capsys):
    from fastp2phd.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--compile"]).compile == "default"
    assert parser.parse_args(["train", "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parser.parse_args(["train"]).compile == "off"
    assert parser.parse_args(["test", "--compile"]).compile == "default"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--compile", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
def test_the_networks_never_wait_for_the_gpu():
    """No op synchronises with the host (instance_mean included), so a step can be captured in a CUDA graph."""
    torch.manual_seed(0)
    spec = ModelSpec(ngf=4, n_downsample_global=2, n_blocks_global=1, nef=4, n_downsample_E=2, instance_feat=True)
    model = Pix2PixHD(spec).cuda()
    netD = MultiscaleDiscriminator(36 + 3, ndf=4, n_layers=2, num_D=2).cuda()
    label = torch.randint(0, 35, (1, 1, 32, 64))
    model.check_labels(label)  # (reads the values: done on the CPU, as the training step does)
    label, inst, image = label.cuda(), instances().cuda(), torch.randn(1, 3, 32, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        input_label = model.encode_input(label, inst, checked=True)
        fake, _ = model(input_label, inst, label, image)
        loss = sum(scale[-1].mean() for scale in netD(torch.cat([input_label, fake], dim=1)))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(p.grad is not None for p in model.netG.parameters())


@requires_cuda
def test_cuda_graphs_train_like_the_eager_step():
    from test_train_step import TINY, batch

    from fastp2phd.cli import build_parser
    from fastp2phd.options import finish_options, train_spec
    from fastp2phd.train_step import TrainStep

    from torch._dynamo.utils import counters

    losses = {}
    for mode in ("reduce-overhead", "off"):
        torch._dynamo.reset()
        counters.clear()
        argv = ["train", "--resize_or_crop", "none", *TINY, "--instance_feat", "--checkpoint_activations",
                "--compile", mode]
        torch.manual_seed(0)
        step = TrainStep(train_spec(finish_options(build_parser().parse_args(argv), is_train=True)),
                         torch.device("cuda"), vgg=Vgg19(pretrained=False))
        losses[mode] = [step.step(batch(seed=1 + i))[0] for i in range(4)]
        assert counters["inductor"]["cudagraph_skips"] == 0  # every compiled graph replays in a CUDA graph
        if mode == "reduce-overhead":
            with pytest.raises(CompileError, match="records CUDA graphs for one input size"):
                step.step(batch(h=32, seed=9))
    for c, e in zip(losses["reduce-overhead"], losses["off"]):
        assert all(c[k] == pytest.approx(e[k], rel=1e-3, abs=1e-5) for k in c)


@requires_cuda
def test_an_eager_training_step_waits_for_the_gpu_once():
    """The loss values are read in one host transfer, just before the optimizer steps (each read drains
    the GPU queue and leaves it idle while the host queues the next work)."""
    import warnings

    from test_train_step import TINY, batch

    from fastp2phd.cli import build_parser
    from fastp2phd.options import finish_options, train_spec
    from fastp2phd.train_step import TrainStep

    argv = ["train", "--resize_or_crop", "none", *TINY, "--instance_feat", "--no_vgg_loss"]
    step = TrainStep(train_spec(finish_options(build_parser().parse_args(argv), is_train=True)), torch.device("cuda"))
    step.step(batch(seed=1))  # warm-up: lazy initialisation may read from the GPU once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step.step(batch(seed=2))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
