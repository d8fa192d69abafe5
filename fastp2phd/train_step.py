"""One pix2pixHD training step: the networks, losses and optimisers of a run, and how a batch updates them.

``TrainStep`` holds G (and E), D, the losses, the image pool, the optimisers and
the grad scaler; ``Trainer`` (``fastp2phd.training``) holds one and adds data, the
run's ``Position``, checkpoints and the loop, and ``fastp2phd.memory`` runs the same
step on fake tensors.

The step, as in the paper: G (and E) produce a fake image; the discriminators
score (label, pooled fake) and (label, real) pairs for the D loss, and (label,
fake) for G's adversarial loss, feature matching and VGG losses (and, only with
``lambda_l1``, which the original does not have, an L1 loss to the real image); every
discriminator pass sees the same, not yet updated, weights, and both
optimisers step at the end. D's gradients are computed before G's adversarial
pass, so the graph of D's real/fake pass is freed before G's losses build
theirs, and G's losses give their gradients at the fake image one branch at a
time (D's, then VGG's) before G's backward: the same update (bit for bit), with
fewer large graphs alive at the peak.
"""
from __future__ import annotations

import contextlib
import math
import random

import torch
from torch import nn

from .compiling import OneSize, compile_networks
from .errors import Pix2PixHDError
from .models import GANLoss, VGGLoss, VGGWeightsNotFound, feature_matching_loss, init_weights
from .models.vgg import Vgg19
from .ops._common import is_fake, memory_format_of
from .pix2pixhd import Pix2PixHD, build_discriminator
from .specs import TrainSpec

LOSS_NAMES = ("G_GAN", "G_GAN_Feat", "G_VGG", "D_real", "D_fake")


class TrainingError(Pix2PixHDError, RuntimeError):
    """Training cannot go on (bad data, a diverged loss, nothing to resume); the message says why."""


class Position:
    """Where a run is: its epoch (from 1), the images of it done, and the images done in all."""

    def __init__(self, epoch: int = 1, epoch_iter: int = 0, total_steps: int = 0):
        self.epoch, self.epoch_iter, self.total_steps = epoch, epoch_iter, total_steps

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epoch_iter": self.epoch_iter, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.epoch_iter, self.total_steps = state["epoch"], state["epoch_iter"], state["total_steps"]


class ImagePool:
    """The original history of generated images shown to D (size 0: pass through)."""

    def __init__(self, pool_size: int, seed: int):
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool_size == 0:
            return images
        out = []
        images = images.detach()
        for i in range(images.shape[0]):
            image = images[i:i + 1]  # (a slice rather than unsqueeze keeps channels_last strides recognisable)
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.uniform(0, 1) > 0.5:
                index = self.rng.randint(0, self.pool_size - 1)
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0).contiguous(memory_format=memory_format_of(images))

    def state_dict(self) -> dict:
        return {"images": [t.cpu() for t in self.images], "rng": list(self.rng.getstate()[1]),
                "rng_version": self.rng.getstate()[0]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.images = [t.to(device) for t in state["images"]]
        self.rng.setstate((state["rng_version"], tuple(state["rng"]), None))


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No gradients for ``module``'s parameters inside the block."""
    params = list(module.parameters())  # (one walk of the module tree, not three: this runs twice a step)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def split_batch(pred, n: int):
    """Discriminator outputs of a concatenated batch -> (first n samples, the rest)."""
    first = [[t[:n] for t in scale] for scale in pred]
    rest = [[t[n:] for t in scale] for scale in pred]
    return first, rest


def learning_rate(spec: TrainSpec, epoch: int) -> float:
    """Constant for niter epochs, then linear decay: the original lowers it after each epoch past niter."""
    if spec.niter_decay == 0:
        return spec.lr
    return spec.lr * max(0.0, 1.0 - max(0, epoch - spec.niter - 1) / spec.niter_decay)


def amp_dtype(spec: TrainSpec, device: torch.device) -> torch.dtype | None:
    if not spec.fp16:
        return None
    if spec.amp_dtype == "fp16":
        return torch.float16
    if spec.amp_dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def moved(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)``, skipped when it is there already (fake parameters, as the memory model
    builds, cannot be moved at all)."""
    if all(t.device == device for t in [*module.parameters(), *module.buffers()]):
        return module
    return module.to(device)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's Adam kernel: load_state_dict takes every setting
    from the saved groups, ``fused`` included, so a run saved before Adam was fused (or on another device)
    would go on with that run's kernel. Step counts go where the kernel wants them."""
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            saved = optimizer.state.get(p, {})
            if isinstance(saved.get("step"), torch.Tensor):
                saved["step"] = saved["step"].to(p.device if on_device else "cpu", torch.float32)


class TrainStep:
    """The networks, losses and optimisers of a training run, and ``step(batch)``.

    ``vgg``: the VGG19 of the perceptual loss (default: pretrained weights, looked up
    as ``fastp2phd.models.vgg`` says). ``position``: the run's (its trainer's), which the
    step only reads: the epoch's learning rate for a new optimiser, and where a loss diverged
    (default: a position of its own at the start). ``on_phase``: called with the name of each
    part of the step as it starts (the memory model attributes bytes with it).
    """

    def __init__(self, spec: TrainSpec, device: torch.device, *, vgg: Vgg19 | None = None,
                 position: Position | None = None):
        self.spec = spec
        self.device = device
        self.position = Position() if position is None else position
        self.on_phase = lambda name: None
        self.model = moved(Pix2PixHD(spec.model, checkpoint=spec.checkpoint_activations), device)
        self.netD = moved(build_discriminator(spec), device)
        for net in (self.model, self.netD):  # G, E and D start from pix2pixHD's initialisation, as in the original
            net.apply(init_weights)
        self.gan_loss = GANLoss(use_lsgan=not spec.no_lsgan)
        try:
            self.vgg_loss = None if spec.no_vgg_loss else moved(
                VGGLoss(spec.vgg_weights, vgg=vgg, checkpoint=spec.checkpoint_activations), device)
        except VGGWeightsNotFound as exc:
            raise TrainingError(str(exc)) from None
        self.pool = ImagePool(spec.pool_size, spec.seed)
        self.amp_dtype = amp_dtype(spec, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.optimizer_D = self.make_adam(self.netD.parameters(), spec.lr)
        self.fixed_global = False
        self.optimizer_G = self.make_optimizer_G(fix_global=spec.niter_fix_global > 0)
        self.memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        if spec.channels_last:  # the ops keep the layout, so it holds from the input to the losses and back
            for net in (self.model, self.netD, self.vgg_loss):
                # net.to(memory_format=...), by .data: `to` swaps fake parameters (the memory model's) and fails
                for t in [*net.parameters(), *net.buffers()] if net is not None else ():
                    if t.dim() == 4:
                        t.data = t.data.to(memory_format=torch.channels_last)
        self.gen, self.disc = self.model, self.netD  # DistributedDataParallel wrappers when several processes train
        self.distributed = False
        compiled = compile_networks([self.model.netG, self.model.netE, self.netD, self.vgg_loss], spec.compile,
                                    device) if not is_fake(next(self.netD.parameters())) else False
        self.one_size = OneSize(spec.compile, device, compiled)

    def make_optimizer_G(self, fix_global: bool) -> torch.optim.Optimizer:
        """Adam over G (and E); with --niter_fix_global, first only the outermost local enhancer."""
        spec = self.spec
        netG = self.model.netG
        if fix_global:  # (TrainSpec checks that netG is local)
            prefix = f"model{spec.model.n_local_enhancers}"
            for name, p in netG.named_parameters():
                p.requires_grad_(name.startswith(prefix))  # the fixed G1 costs no gradient work
            params = [p for name, p in netG.named_parameters() if name.startswith(prefix)]
        else:
            netG.requires_grad_(True)
            params = list(netG.parameters())
        if self.model.netE is not None:
            params += list(self.model.netE.parameters())
        self.fixed_global = fix_global
        return self.make_adam(params, learning_rate(spec, self.position.epoch))

    def make_adam(self, params, lr: float) -> torch.optim.Optimizer:
        """The original's Adam (betas (beta1, 0.999)), run by torch's fused kernel on CPUs and CUDA GPUs: one pass
        over each parameter, not a dozen ops per parameter (in a training step on a 2-core EPYC, the 512p G's
        update took 90 ms instead of 280), and no temporary copy of every parameter, as CUDA's default
        multi-tensor Adam makes (696 MB for that G). Its updates match the unfused Adam's to rounding."""
        fused = True if self.device.type in ("cpu", "cuda") else None
        return torch.optim.Adam(params, lr=lr, betas=(self.spec.beta1, 0.999), fused=fused)

    def train_whole_generator(self) -> None:
        """End --niter_fix_global: from now on G's optimiser updates all of G (its Adam state starts afresh,
        as in the original)."""
        self.optimizer_G = self.make_optimizer_G(fix_global=False)
        if self.distributed:  # DistributedDataParallel takes the parameters that need gradients when it is built
            self.distribute()

    def set_learning_rate(self, lr: float) -> None:
        for optimizer in (self.optimizer_G, self.optimizer_D):
            for group in optimizer.param_groups:
                group["lr"] = lr

    def networks(self) -> dict[str, nn.Module]:
        """The networks under the original checkpoints' names: G, D and (with features) E."""
        nets = {"G": self.model.netG, "D": self.netD}
        if self.model.netE is not None:
            nets["E"] = self.model.netE
        return nets

    def restart_optimizer_G(self, fix_global: bool) -> None:
        """A fresh optimiser for G (and E): the networks came from files without optimiser state."""
        self.optimizer_G = self.make_optimizer_G(fix_global=fix_global)

    def distribute(self) -> None:
        """DistributedDataParallel around G(+E) and D: the step then runs in one of several processes."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # The gradients are views into DDP's communication buckets, not a second copy of them beside the buckets.
        self.gen = DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
        self.disc = DistributedDataParallel(self.netD, device_ids=ids, gradient_as_bucket_view=True)
        self.distributed = True

    def state_dict(self) -> dict:
        """The networks, the optimisers and the grad scaler: what resumes the step bit for bit. (The position
        is the trainer's; the image pool and the random state are each process's own: the trainer saves those.)"""
        state = {
            "fixed_global": self.fixed_global,
            "netG": self.model.netG.state_dict(), "netD": self.netD.state_dict(),
            "optimizer_G": self.optimizer_G.state_dict(), "optimizer_D": self.optimizer_D.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.model.netE is not None:
            state["netE"] = self.model.netE.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s output (a KeyError names what a damaged one lacks)."""
        self.model.netG.load_state_dict(state["netG"])
        self.netD.load_state_dict(state["netD"])
        if self.model.netE is not None:
            self.model.netE.load_state_dict(state["netE"])
        self.optimizer_G = self.make_optimizer_G(fix_global=state["fixed_global"])  # (its parameters depend on it)
        load_optimizer_state(self.optimizer_G, state["optimizer_G"])
        load_optimizer_state(self.optimizer_D, state["optimizer_D"])
        self.scaler.load_state_dict(state["scaler"])

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=self.memory_format) if self.spec.channels_last else t

    def _read_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss values, or a TrainingError when one is not finite (before any weight is updated).

        One host read for all of them (stacked): each read waits for the GPU to drain, and the
        reads used to be five per step, each leaving the GPU idle while the host queued the next work."""
        if any(is_fake(v) for v in losses.values()):  # the memory model's fake tensors have no values
            return {k: 0.0 for k in losses}
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"the loss {', '.join(bad)} is {values[bad[0]]} at epoch {self.position.epoch}, iteration "
                f"{self.position.epoch_iter}: "
                "training diverged; lower --lr, or try without --fp16"
            )
        return values

    def _backward_to(self, generated: torch.Tensor, loss: torch.Tensor) -> None:
        """The gradient of (scaled) ``loss`` added to ``generated.grad``, its graph freed; none where it has none.
        A slice of a larger gradient (D's input pairs give one) is copied: it would keep the whole alive through
        G's backward."""
        if not loss.requires_grad:
            return
        self.on_phase("G backward")
        self.scaler.scale(loss).backward(inputs=[generated])
        self.on_phase("G losses")
        if generated.grad.untyped_storage().nbytes() > generated.grad.nbytes:
            generated.grad = generated.grad.clone()

    def step(self, batch: dict) -> tuple[dict[str, float], torch.Tensor]:
        """Update G (and E) and D on one batch; returns the loss values and the generated images."""
        spec, model_spec = self.spec, self.spec.model
        self.model.check_labels(batch["label"])  # on the loader's CPU tensors: no wait for the GPU
        batch = self._to_device(batch)
        label, inst, real = batch["label"], batch["inst"], self._layout(batch["image"])
        feat = batch["feat"] if model_spec.load_features else None
        self.model.check_size(label, (batch.get("path") or [None])[0])  # (one size per batch: its first file)
        self.one_size.check(real)
        self.on_phase("inputs")
        # Under autocast the label input is built in its low-precision type: the one-hot and boundary
        # maps are exact there, and concatenated with G's (or E's) low-precision outputs they stay so.
        input_label = self.model.encode_input(label, None if model_spec.no_instance else inst,
                                              self.amp_dtype or torch.float32, checked=True)
        input_label = self._layout(input_label)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        self.on_phase("G forward")
        with autocast:
            fake, _ = self.gen(input_label, inst, label, real, feat)
            # G's losses take their gradients at ``generated`` one branch at a time (D's, then VGG's), each graph
            # freed before the next is built, and G's backward runs once on their sum: D's activations for G's
            # loss were alive through VGG's backward, the step's peak (label2city_1024p, fp32, checkpointing:
            # 7.98 GiB, 7.14 without them).
            generated = fake.detach().requires_grad_(fake.requires_grad)  # (a leaf: its graphs end there)
            pooled_fake = self.pool.query(torch.cat([input_label, generated.detach()], dim=1))
            # Under autocast the real pair is built in the label's low-precision type, as the fake one is: D's first
            # convolution casts it so anyway, and a float32 pair (and its cast copy) doubled the bytes of D's input.
            real_pair = torch.cat([input_label, real.to(input_label.dtype)], dim=1)
            self.on_phase("D forward")
            if model_spec.norm == "instance":  # per-sample norms: one batch for both pairs
                pairs, fakes = torch.cat([pooled_fake, real_pair]), pooled_fake.shape[0]
                del pooled_fake, real_pair  # (copied into the pairs: not alive through D's pass)
                pred = self.disc(pairs)
                del pairs
                pred_fake_pool, pred_real = split_batch(pred, fakes)
            else:  # batch norm statistics must not mix fake and real images
                pred = None
                pred_fake_pool, pred_real = self.disc(pooled_fake), self.disc(real_pair)
                del pooled_fake, real_pair
            loss_D_fake = self.gan_loss(pred_fake_pool, False)
            loss_D_real = self.gan_loss(pred_real, True)
        losses_D = {"D_real": loss_D_real.detach(), "D_fake": loss_D_fake.detach()}
        self.on_phase("D backward")
        self.optimizer_D.zero_grad(set_to_none=True)
        self.scaler.scale((loss_D_fake + loss_D_real) * 0.5).backward()
        del pred, pred_fake_pool, loss_D_fake, loss_D_real  # D's graph is gone; pred_real keeps its values

        self.on_phase("G losses")
        self.optimizer_G.zero_grad(set_to_none=True)
        with autocast:
            with frozen(self.netD):
                pred_fake = self.netD(torch.cat([input_label, generated], dim=1))
            del input_label  # (G's graph keeps what it needs)
            loss_G_GAN = self.gan_loss(pred_fake, True)
            loss_G_feat = (feature_matching_loss(pred_fake, pred_real, spec.lambda_feat)
                           if not spec.no_ganFeat_loss else fake.new_zeros(()))
            del pred_fake, pred_real  # the losses keep what backward needs (the signs of the differences)
        self._backward_to(generated, loss_G_GAN + loss_G_feat)
        with autocast:
            loss_G_VGG = (self.vgg_loss(generated.float(), real) * spec.lambda_feat
                          if self.vgg_loss is not None else fake.new_zeros(()))
            losses_G = {"G_GAN": loss_G_GAN, "G_GAN_Feat": loss_G_feat, "G_VGG": loss_G_VGG}
            if spec.lambda_l1:  # not in the original: logged as its own entry only when it is on
                losses_G["G_L1"] = (generated.float() - real).abs().mean() * spec.lambda_l1
        self._backward_to(generated, loss_G_VGG + losses_G.get("G_L1", 0))
        self.on_phase("G backward")
        if generated.grad is not None:
            fake.backward(generated.grad)
        values = self._read_losses({**losses_G, **losses_D})  # the step's one wait for the GPU
        self.on_phase("optimizer steps")
        self.scaler.step(self.optimizer_G)
        self.scaler.step(self.optimizer_D)
        self.scaler.update()
        # Free the gradients now rather than at the next step's backward: they would sit through its forward.
        self.optimizer_G.zero_grad(set_to_none=True)
        self.optimizer_D.zero_grad(set_to_none=True)
        return values, fake.detach()
