"""The memory model: peak bytes of one training step (or one inference) for an option set, on any machine.

The networks are built, and the step runs, inside ``FakeTensorMode``: every tensor has
its shape, dtype and device but no storage, so the 2048x1024 step of the largest
pix2pixHD estimates in seconds on a CPU-only machine. ``LiveBytes``, a dispatch mode,
sees the outputs of every op and adds up the bytes of the storages alive (a weak
reference says when one is freed); the largest sum is the peak. Every storage is
charged to what allocated it: a network's forward (G, E, D, VGG), a part of the step
(its backward passes, the optimiser steps), the parameters, the batch.

The step is ``TrainStep.step`` itself: the second of two steps is measured (it starts as every step
of a long run does: with the Adam states the first created, a full image pool, the last step's images),
and a third counts FLOPs. By default the model is a CUDA run: ``"auto"`` takes the GPU fast paths
(their fake kernels), and mixed precision runs CPU autocast (the fake tensors are CPU tensors) with
CUDA's rules where they differ (``autocast_rules_of``: CPU's pads in float32). Left out: the CUDA context
(about 0.3-0.6 GiB), cuDNN/cuBLAS workspaces, and the caching allocator's rounding and fragmentation
(typically 5-15% over the peak of live tensors).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import warnings
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import InvalidArgumentError
from .specs import DataSpec, ModelSpec, TrainSpec

GiB = 1024**3


class LiveBytes(TorchDispatchMode):
    """Bytes of live storages as ops allocate them, their peak, and what allocated what was alive then.

    ``label`` names what is running (set by the caller); each new storage is charged to it.
    """

    def __init__(self):
        super().__init__()
        self.label = "setup"
        self.live = 0
        self.peak = 0
        self.peak_label = "setup"
        self.at_peak: dict[str, int] = {}
        self.by_label: dict[str, int] = defaultdict(int)
        self._seen: set[int] = set()

    def reset_peak(self) -> None:
        self.peak, self.peak_label, self.at_peak = self.live, self.label, dict(self.by_label)

    def _charge(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        nbytes, label = storage.nbytes(), self.label
        self._seen.add(key)
        self.live += nbytes
        self.by_label[label] += nbytes
        weakref.finalize(storage, self._release, key, nbytes, label)

    def _release(self, key: int, nbytes: int, label: str) -> None:
        self._seen.discard(key)
        self.live -= nbytes
        self.by_label[label] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._charge(t)
        if self.live > self.peak:
            self.reset_peak()
        return out


# Common GPU memory sizes (GB, taken as GiB as their makers mean it), for "fits a ... GPU".
GPU_SIZES = (8, 12, 16, 24, 80)
# What the estimate leaves out, for "fits": the CUDA context, and the caching allocator's slack.
CUDA_CONTEXT_BYTES = GiB // 2
ALLOCATOR_SLACK = 0.10


def smallest_gpu(peak_bytes: int) -> int | None:
    """The smallest of GPU_SIZES (GB) that holds a peak of live tensors with context and allocator slack."""
    needed = peak_bytes * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES
    return next((size for size in GPU_SIZES if needed <= size * GiB), None)


@dataclass
class MemoryEstimate:
    """Peak bytes of live tensors in one step, and what they were."""

    what: str  # "training step" or "inference"
    config: dict  # the options that shape it (networks, size, batch, precision)
    peak_bytes: int
    peak_during: str  # the part of the step where the peak occurred
    at_peak: dict[str, int]  # live bytes at the peak, by what allocated them
    flops: int  # floating-point operations of the step (convolutions and matrix products), recomputation included
    measured_bytes: int | None = None  # torch.cuda.max_memory_allocated of the real step, with --measure
    notes: list[str] = field(default_factory=list)

    @property
    def fits_gpu_gb(self) -> int | None:
        return smallest_gpu(self.peak_bytes)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "fits_gpu_gb": self.fits_gpu_gb}, indent=2)

    def format(self) -> str:
        gib = lambda n: f"{n / GiB:6.2f} GiB"  # noqa: E731
        c = self.config
        fits = self.fits_gpu_gb
        lines = [f"fastp2phd memory: {self.what} of {c['network']} at {c['height']}x{c['width']}, batch {c['batch']}, "
                 f"{c['precision']}, {c['device']} fast paths" + (", activation checkpointing" if c.get("checkpointing") else ""),
                 f"  estimated peak      {gib(self.peak_bytes)}   (at: {self.peak_during}); "
                 + (f"fits a GPU of {fits} GB" if fits else f"more than a GPU of {GPU_SIZES[-1]} GB holds"),
                 f"  compute             {self.flops / 1e12:6.2f} TFLOP"]
        if self.measured_bytes is not None:
            lines.append(f"  measured peak       {gib(self.measured_bytes)}   (torch.cuda.max_memory_allocated)")
        lines.append("  alive at the peak, by what allocated it:")
        for label, nbytes in sorted(self.at_peak.items(), key=lambda kv: -kv[1]):
            if nbytes >= 1 << 20:
                lines.append(f"    {label:<44}{gib(nbytes)}")
        lines.append(f"  Left out: the CUDA context (about {CUDA_CONTEXT_BYTES / GiB:.1f} GiB) and allocator slack "
                     f"(typically 5-15%); 'fits' allows for both.")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _config(model: ModelSpec, size: tuple[int, int], batch: int, device_type: str, amp: torch.dtype | None,
            train: TrainSpec | None) -> dict:
    network = f"{model.netG} G (ngf {model.ngf})"
    if train is not None:
        if model.has_encoder:
            network += f" + E (nef {model.nef})"
        network += f" + {train.num_D} D (ndf {train.ndf})" + ("" if train.no_vgg_loss else " + VGG19 loss")
    return {"network": network, "height": size[0], "width": size[1], "batch": batch,
            "precision": {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp],
            "device": device_type, "checkpointing": bool(train and train.checkpoint_activations)}


def default_size(data: DataSpec, model: ModelSpec) -> tuple[int, int]:
    """(height, width) of the images ``data`` makes of Cityscapes' 2048x1024 images, rounded to ``model``'s multiple."""
    from .data.transforms import processed_size

    # The loader's own rule: a crop larger than the scaled image (loadSize == fineSize) leaves it uncropped.
    width, height = processed_size(data, (2048, 1024))
    multiple = model.size_multiple
    return max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)


def _fake_batch(model: ModelSpec, batch: int, size: tuple[int, int], random: bool = False) -> dict:
    """A batch of the shapes and dtypes the data loader gives (zeros; with ``random``, values a real step can use)."""
    n, (h, w) = batch, size
    g = torch.Generator().manual_seed(0)
    if model.label_nc == 0:
        label = torch.rand(n, model.input_nc, h, w, generator=g) if random else torch.zeros(n, model.input_nc, h, w)
    elif random:
        label = torch.randint(0, model.label_nc, (n, 1, h, w), generator=g)
    else:
        label = torch.zeros(n, 1, h, w, dtype=torch.int64)
    batch = {"label": label,
             "inst": torch.randint(0, 4, (n, 1, h, w), generator=g) if random else torch.zeros(n, 1, h, w, dtype=torch.int64),
             "image": (torch.rand(n, model.output_nc, h, w, generator=g) * 2 - 1 if random
                       else torch.zeros(n, model.output_nc, h, w))}
    if model.load_features:
        batch["feat"] = torch.zeros(n, model.feat_num, h, w)
    return batch


# What the step allocates outside the networks, by the part of the step it happens in.
PHASE_LABELS = {
    "inputs": "inputs (one-hot labels, boundary map)",
    "G forward": "G forward: concatenated inputs and pairs",
    "D forward": "D forward: the real/fake batch",
    "D backward": "D gradients",
    "G losses": "G losses: pairs, loss terms",
    "G backward": "G backward: gradients, recomputation",
    "optimizer steps": "optimizer states (Adam)",
    "image pool": "image pool (--pool_size)",
}


def _label_networks(tracker: LiveBytes, networks: dict[str, torch.nn.Module | None]) -> None:
    """Charge what a network's forward allocates to the network (D's twice: for D's loss and for G's)."""
    for name, net in networks.items():
        if net is None:
            continue

        def enter(module, args, name=name):
            module._memory_outer_label = tracker.label
            if name == "D":
                name = "D (for G's loss)" if tracker.label.startswith("G losses") else "D (for D's loss)"
            tracker.label = f"{name} activations"

        def leave(module, args, output):
            tracker.label = module._memory_outer_label

        net.register_forward_pre_hook(enter)
        net.register_forward_hook(leave)


@contextlib.contextmanager
def autocast_rules_of(device_type: str):
    """CPU autocast (what runs on the fake tensors, which are CPU tensors) with CUDA's rules, for ``"cuda"``, where
    they differ for pix2pixHD's ops: CPU autocast pads (reflection, replication) in float32, CUDA's in the input's
    type; CUDA's takes pow in float32. Kernels registered for the process while the block runs (the estimates run
    one at a time)."""
    if device_type != "cuda":
        yield
        return
    lib = torch.library.Library("aten", "IMPL")
    autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel_of(op, float32: bool):
        def kernel(x, *args):
            with torch._C._ExcludeDispatchKeyGuard(autocast):
                return op(x.float() if float32 and x.dtype in (torch.float16, torch.bfloat16) else x, *args)
        return kernel

    with warnings.catch_warnings():  # (that a kernel of PyTorch's is overridden: for this block, as meant)
        warnings.simplefilter("ignore")
        for name, op, float32 in (("reflection_pad2d", torch.ops.aten.reflection_pad2d.default, False),
                                  ("replication_pad2d", torch.ops.aten.replication_pad2d.default, False),
                                  ("pow.Tensor_Scalar", torch.ops.aten.pow.Tensor_Scalar, True)):
            lib.impl(name, kernel_of(op, float32), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


class _SteppingGradScaler(torch.amp.GradScaler):
    """--fp16's grad scaler (float16), stepping without reading whether the gradients overflowed: fake tensors
    hold no values to read. It allocates what the real one does (in-place unscaling, a few scalars)."""

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)


def first_step(step, batch: dict) -> torch.Tensor:
    """Run ``step``'s first step on ``batch``, leaving it as every later step of a long run finds it: with Adam
    states for all of G (with --niter_fix_global the run's peak comes after those epochs, when all of G trains)
    and a full image pool (--pool_size: it fills over the run's first steps). Returns the generated images, which
    the training loop keeps through the next step."""
    if step.fixed_global:
        step.train_whole_generator()
    images = step.step(batch)[1]
    step.on_phase("image pool")
    pool = step.pool
    while 0 < len(pool.images) < pool.pool_size:
        pool.images.append(pool.images[-1].clone())
    return images


def estimate_training_step(spec: TrainSpec, size: tuple[int, int] | None = None, device_type: str = "cuda",
                           step_class=None, *, fake: bool = True) -> MemoryEstimate:
    """Peak memory of one training step of ``spec`` on images of ``size`` (height, width; default
    ``default_size``).

    ``device_type``: whose fast paths to model ("cuda" or "cpu"). ``step_class``: a TrainStep
    (sub)class whose ``step`` to run (the benchmarks pass the original code's step).
    ``fake=False`` tracks the same steps on real CPU tensors (small sizes only): what the tests
    compare the fake estimate with.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from .models.vgg import Vgg19
    from .ops._dispatch import memory_model_device
    from .train_step import TrainStep

    if not fake and device_type != "cpu":
        raise InvalidArgumentError("a training step on real tensors is tracked on the CPU only (device_type='cpu')")
    step_class = step_class or TrainStep
    size = size or default_size(spec.data, spec.model)
    check_size(spec.model, size)
    tracker = LiveBytes()
    flops = FlopCounterMode(display=False)
    with (FakeTensorMode() if fake else contextlib.nullcontext(), tracker, memory_model_device(device_type),
          autocast_rules_of(device_type)):
        tracker.label = "parameters and buffers"
        step = step_class(spec, torch.device("cpu"), vgg=None if spec.no_vgg_loss else Vgg19(pretrained=False))
        tracker.label = "batch"
        batch = _fake_batch(spec.model, spec.batchSize, size, random=not fake)
        _label_networks(tracker, {"G": step.model.netG, "E": step.model.netE, "D": step.netD, "VGG": step.vgg_loss})

        def phase(name: str) -> None:
            tracker.label = PHASE_LABELS.get(name, name)

        step.on_phase = phase
        if fake and step.scaler.is_enabled():
            step.scaler = _SteppingGradScaler(step.device.type)
        images = first_step(step, batch)
        tracker.label = "between steps"
        tracker.reset_peak()
        step.step(batch)
        peak, peak_label, at_peak = tracker.peak, tracker.peak_label, tracker.at_peak
        del images
        with flops:  # a step of its own: counting FLOPs changes what autograd keeps
            step.step(batch)
    config = _config(spec.model, size, spec.batchSize, device_type, step.amp_dtype, spec)
    return MemoryEstimate("training step", config, peak, peak_label,
                          {k: v for k, v in at_peak.items() if v > 0}, flops.get_total_flops())


def estimate_inference(model_spec: ModelSpec, size: tuple[int, int], batch: int = 1,
                       device_type: str = "cuda", precision: str = "fp32") -> MemoryEstimate:
    """Peak memory of generating one batch without autograd, as ``fastp2phd test --precision`` does: fp32, or
    bf16/fp16 autocast (float32 weights, and autocast's low-precision copies of them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from .ops._dispatch import memory_model_device
    from .pix2pixhd import PRECISIONS, Pix2PixHD, autocast_dtype

    check_size(model_spec, size)
    if precision not in PRECISIONS or device_type == "cpu":
        autocast_dtype(precision, "cpu")  # the sentence test gives for an unknown precision, or fp16 on the CPU
    amp = PRECISIONS[precision]
    # The fake tensors are CPU tensors, where generate refuses fp16: bf16 runs instead, whose tensors are as large.
    run_as = "fp32" if amp is None else "bf16"
    tracker = LiveBytes()
    flops = FlopCounterMode(display=False)
    with FakeTensorMode(), tracker, memory_model_device(device_type), autocast_rules_of(device_type), torch.no_grad():
        tracker.label = "parameters and buffers"
        model = Pix2PixHD(model_spec).eval()
        tracker.label = "batch"
        data = _fake_batch(model_spec, batch, size)
        # Features from clusters or the encoder take the same memory: a feat_num-channel map.
        feat = torch.zeros(batch, model_spec.feat_num, *size) if model_spec.uses_features else None
        _label_networks(tracker, {"G": model.netG})
        tracker.label = PHASE_LABELS["inputs"]
        model.generate(data["label"], data["inst"], feat=feat, precision=run_as)
        peak, peak_label, at_peak = tracker.peak, tracker.peak_label, tracker.at_peak
        with flops:  # a run of its own, as for training
            model.generate(data["label"], data["inst"], feat=feat, precision=run_as)
    return MemoryEstimate("inference", _config(model_spec, size, batch, device_type, amp, None), peak, peak_label,
                          {k: v for k, v in at_peak.items() if v > 0}, flops.get_total_flops())


@functools.lru_cache(maxsize=16)
def inference_bytes_per_pixel(model_spec: ModelSpec, device_type: str = "cuda", precision: str = "fp32") -> int:
    """Bytes generating an image (``estimate_inference``) needs per pixel beyond the parameters: the slope
    between two small sizes, since every activation grows with the pixels. 0 where it cannot be estimated."""
    m = model_spec.size_multiple
    try:  # (4m: G's 7x7 reflection padding and its residual blocks' at the bottleneck need a few pixels)
        small, large = (estimate_inference(model_spec, (4 * m, w * m), device_type=device_type,
                                           precision=precision).peak_bytes for w in (4, 8))
    except Exception:  # a safety check must not stop a run the model cannot estimate: the data's own bound stays
        return 0
    return math.ceil((large - small) / (16 * m * m))


@functools.lru_cache(maxsize=16)
def training_bytes_per_pixel(spec: TrainSpec, device_type: str = "cuda") -> int:
    """Bytes a training step (``estimate_training_step``, the whole batch) needs per pixel of its images,
    beyond the parameters and optimizer states: the slope between two small sizes. 0 where it cannot be
    estimated."""
    m = spec.model.size_multiple
    try:
        small, large = (estimate_training_step(spec, (4 * m, w * m), device_type=device_type).peak_bytes
                        for w in (4, 8))
    except Exception:  # a safety check must not stop a run the model cannot estimate: the data's own bound stays
        return 0
    return math.ceil((large - small) / (16 * m * m))


def host_memory() -> int:
    """Bytes this process may use: the machine's memory, or less where RLIMIT_AS or a cgroup limits it."""
    limits = []
    with contextlib.suppress(AttributeError, ValueError, OSError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    with contextlib.suppress(ValueError, OSError):  # cgroup v2 ("max" when unlimited)
        with open("/sys/fs/cgroup/memory.max") as f:
            limits.append(int(f.read()))
    return min(limits, default=1 << 62)


def device_memory(device: torch.device) -> int:
    """Bytes of a CUDA device's memory; 0 for the CPU (whose memory is ``host_memory``)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0


def check_size(model: ModelSpec, size: tuple[int, int]) -> None:
    """The sentence ``train`` gives for a size the generator cannot take."""
    multiple, smallest = model.size_multiple, model.min_size
    h, w = size
    if h < smallest or w < smallest:  # (0 too) the generator's reflection padding needs more pixels
        raise InvalidArgumentError(f"size {h}x{w} is smaller than the {smallest}x{smallest} this generator needs; "
                                   f"choose a --size of at least {smallest}x{smallest}")
    if h % multiple or w % multiple:
        raise InvalidArgumentError(f"size {h}x{w} is not a multiple of {multiple}, which this generator needs; "
                                   f"choose a --size whose height and width are multiples of {multiple}")


def parse_size(text: str) -> tuple[int, int]:
    """'1024x2048' -> (1024, 2048)."""
    height, sep, width = text.lower().partition("x")
    if not sep or not height.strip().isdigit() or not width.strip().isdigit():
        raise InvalidArgumentError(f"--size {text!r} is not HEIGHTxWIDTH; write it like 1024x2048")
    return int(height), int(width)


def measure_training_step(spec: TrainSpec, size: tuple[int, int], step_class=None) -> int:
    """torch.cuda.max_memory_allocated of a real second training step on the current CUDA device."""
    from .models.vgg import Vgg19
    from .train_step import TrainStep

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    step = (step_class or TrainStep)(spec, device, vgg=None if spec.no_vgg_loss else Vgg19(pretrained=False))
    batch = {k: v.to(device) for k, v in _fake_batch(spec.model, spec.batchSize, size, random=True).items()}
    images = first_step(step, batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step.step(batch)
    torch.cuda.synchronize()
    del images
    return torch.cuda.max_memory_allocated()
