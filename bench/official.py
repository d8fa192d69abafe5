"""pix2pixHD's original formulations of the ops, written from the paper and its code's
described behaviour, as baselines for the benchmarks (never used by the library)."""
from __future__ import annotations

import torch


def official_edges(inst: torch.Tensor) -> torch.Tensor:
    """The original get_edges: four masked passes over a byte tensor, then a float copy."""
    edge = torch.zeros(inst.shape, dtype=torch.bool, device=inst.device)
    edge[:, :, :, 1:] = edge[:, :, :, 1:] | (inst[:, :, :, 1:] != inst[:, :, :, :-1])
    edge[:, :, :, :-1] = edge[:, :, :, :-1] | (inst[:, :, :, 1:] != inst[:, :, :, :-1])
    edge[:, :, 1:, :] = edge[:, :, 1:, :] | (inst[:, :, 1:, :] != inst[:, :, :-1, :])
    edge[:, :, :-1, :] = edge[:, :, :-1, :] | (inst[:, :, 1:, :] != inst[:, :, :-1, :])
    return edge.float()


def official_encode_input(label: torch.Tensor, inst: torch.Tensor, label_nc: int, no_instance: bool) -> torch.Tensor:
    """The original encode_input: a zeroed float32 one-hot map filled by scatter_ (the label map itself with
    --label_nc 0), then the 4-pass edge map."""
    if label_nc == 0:
        input_label = label.float()
    else:
        n, _, h, w = label.shape
        input_label = torch.zeros(n, label_nc, h, w, device=label.device).scatter_(1, label.long(), 1.0)
    return input_label if no_instance else torch.cat([input_label, official_edges(inst)], dim=1)


class OfficialGANLoss:
    """The original GANLoss: nn.MSELoss (BCE with --no_lsgan; on logits here, as fastp2phd's D gives them) of each
    scale's prediction against a target tensor filled with the label, kept and remade when the size changes
    (at every scale of a multiscale D). In float32, as CUDA's autocast runs these losses."""

    def __init__(self, use_lsgan: bool = True):
        self.loss = torch.nn.MSELoss() if use_lsgan else torch.nn.BCEWithLogitsLoss()
        self.targets: dict[bool, torch.Tensor | None] = {True: None, False: None}

    def __call__(self, pred_scales, target_is_real: bool) -> torch.Tensor:
        loss = 0
        for scale in pred_scales:
            pred = scale[-1].to(torch.promote_types(scale[-1].dtype, torch.float32))
            target = self.targets[target_is_real]
            if target is None or target.numel() != pred.numel():
                target = self.targets[target_is_real] = torch.full_like(pred, float(target_is_real))
            loss = loss + self.loss(pred, target)
        return loss


def official_instance_pool(outputs: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """The original Encoder pooling: a Python loop over ids x batch items x channels,
    each step finding the instance's pixels with nonzero() (a host sync on CUDA)."""
    pooled = outputs.clone()
    for value in torch.unique(inst).tolist():
        for b in range(outputs.shape[0]):
            where = (inst[b:b + 1] == value).nonzero()  # (k, 4) indices into the (1, 1, H, W) slice
            for c in range(outputs.shape[1]):
                index = (where[:, 0] + b, where[:, 1] + c, where[:, 2], where[:, 3])
                values = outputs[index]
                pooled[index] = values.mean().expand_as(values)
    return pooled


def index_add_instance_mean(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """The straightforward vectorised formulation: unique ids, index_add sums and counts, gather; returns an
    NCHW-contiguous tensor, as instance_mean does."""
    n, c, h, w = feat.shape
    ids, segment = torch.unique(inst.reshape(n, h * w), return_inverse=True)
    index = (segment + torch.arange(n, device=feat.device)[:, None] * ids.numel()).reshape(-1)  # (n*h*w,)
    pixels = feat.permute(0, 2, 3, 1).reshape(-1, c)
    sums = torch.zeros(n * ids.numel(), c, device=feat.device, dtype=feat.dtype).index_add(0, index, pixels)
    counts = torch.zeros(n * ids.numel(), device=feat.device, dtype=feat.dtype).index_add(
        0, index, torch.ones_like(index, dtype=feat.dtype))
    means = sums / counts.clamp_min(1)[:, None]
    # .contiguous(): an (N, C, H, W) tensor like the other providers' (the permute alone is a channels-last view)
    return means[index].reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()


def official_instance_features(feat_map: torch.Tensor, inst: torch.Tensor, label_nc: int = 35) -> dict:
    """The original encode_features: per instance, nonzero() then the middle pixel's features
    and the area relative to H*W/32, appended row by row to a per-class array."""
    import numpy as np

    feat_num = feat_map.shape[1]
    h, w = inst.shape[2], inst.shape[3]
    features = {label: np.zeros((0, feat_num + 1)) for label in range(label_nc)}
    for b in range(inst.shape[0]):
        for i in np.unique(inst[b:b + 1].cpu().numpy().astype(int)):
            label = i if i < 1000 else i // 1000
            idx = (inst[b:b + 1] == int(i)).nonzero()
            num = idx.shape[0]
            idx = idx[num // 2, :]
            val = np.zeros((1, feat_num + 1))
            for k in range(feat_num):
                val[0, k] = feat_map[b + idx[0], idx[1] + k, idx[2], idx[3]].item()
            val[0, feat_num] = float(num) / (h * w // 32)
            features[label] = np.append(features[label], val, axis=0)
    return features


# ----------------------------------------------------------------------------- the original training step


def official_vgg_features(vgg, x: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's VGG19 trunk, run as the original runs it: its max pools keep int64 indices for backward
    (fastp2phd's Vgg19 finds the maxima again instead)."""
    import torch.nn.functional as F

    features = []
    for vgg_slice in vgg.slices():
        for layer in vgg_slice:
            x = F.max_pool2d(x, layer.kernel_size, layer.stride) if isinstance(layer, torch.nn.MaxPool2d) else layer(x)
        features.append(x)
    return features


def official_vgg_loss(vgg, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The original VGGLoss: all five feature maps of both images, then L1 per map."""
    import torch.nn.functional as F

    x_feats, y_feats = official_vgg_features(vgg, x), official_vgg_features(vgg, y)
    loss = x.new_zeros(())
    for weight, xf, yf in zip((1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0), x_feats, y_feats):
        loss = loss + weight * F.l1_loss(xf, yf.detach())
    return loss


def official_feature_matching(pred_fake, pred_real, n_layers_D: int, num_D: int, lambda_feat: float) -> torch.Tensor:
    import torch.nn.functional as F

    feat_weights = 4.0 / (n_layers_D + 1)
    loss = pred_fake[0][0].new_zeros(())
    for i in range(num_D):
        for j in range(len(pred_fake[i]) - 1):
            loss = loss + F.l1_loss(pred_fake[i][j], pred_real[i][j].detach()) * (feat_weights / num_D * lambda_feat)
    return loss


def official_train_step_class(joint_discriminator: bool = False, original_adam: bool = True):
    """A TrainStep with the original code's modules and step: the input encoded as the original does it
    (4-pass edges), InstanceNorm2d + in-place ReLU, D run on the pooled fake and the real pair separately
    and again, unfrozen, on the fake; every loss built (the GAN losses against target tensors, F.l1_loss,
    VGG features of both images kept) before G's backward, then D's backward.

    ``joint_discriminator``: score the pooled fake and the real pair as one batch, as fastp2phd does
    (per-sample norms make it the same computation, but not to the last bit): the plain step
    fastp2phd's memory savings are checked against, bit for bit.
    ``original_adam``: torch's default Adam, as the original builds it; False: fastp2phd's (fused, the same
    updates to rounding), so that two steps are compared bit for bit.
    """
    from fastp2phd.models import Encoder, MultiscaleDiscriminator
    from fastp2phd.train_step import TrainStep, moved, split_batch

    class OfficialTrainStep(TrainStep):
        def __init__(self, spec, device, *, vgg=None):
            super().__init__(spec, device, vgg=vgg)
            model, sd = self.model, self.model.netG.state_dict()
            netG = moved(type(model.netG)(**model.netG.options, fused=False), device)
            netG.load_state_dict(sd)
            model.netG = netG
            if model.netE is not None:
                netE = moved(Encoder(**model.netE.options, fused=False), device)
                netE.load_state_dict(model.netE.state_dict())
                model.netE = netE
            o = self.netD.options
            netD = moved(MultiscaleDiscriminator(o["input_nc"], o["ndf"], o["n_layers"], o["norm"], num_D=o["num_D"],
                                                  getIntermFeat=o["getIntermFeat"], fused=False), device)
            netD.load_state_dict(self.netD.state_dict())
            self.netD = netD
            self.gen, self.disc = model, netD
            self.optimizer_D = self.make_adam(netD.parameters(), spec.lr)
            self.optimizer_G = self.make_optimizer_G(fix_global=False)
            self.gan_loss = OfficialGANLoss(use_lsgan=not spec.no_lsgan)

        def make_adam(self, params, lr):
            if original_adam:
                return torch.optim.Adam(params, lr=lr, betas=(self.spec.beta1, 0.999))
            return super().make_adam(params, lr)

        def step(self, batch):
            spec = self.spec
            batch = self._to_device(batch)
            label, inst, real = batch["label"], batch["inst"], batch["image"]
            self.on_phase("G forward")
            input_label = official_encode_input(label, inst, spec.model.label_nc, spec.model.no_instance)
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
            with autocast:
                fake, _ = self.gen(input_label, inst, label, real, None)
                self.on_phase("D forward")
                pooled_fake = self.pool.query(torch.cat([input_label, fake.detach()], dim=1))
                real_pair = torch.cat([input_label, real], dim=1)
                if joint_discriminator and spec.model.norm == "instance":
                    pred_fake_pool, pred_real = split_batch(self.netD(torch.cat([pooled_fake, real_pair])),
                                                            pooled_fake.shape[0])
                else:
                    pred_fake_pool, pred_real = self.netD(pooled_fake), self.netD(real_pair)
                loss_D_fake = self.gan_loss(pred_fake_pool, False)
                loss_D_real = self.gan_loss(pred_real, True)
                self.on_phase("G losses")
                pred_fake = self.netD(torch.cat([input_label, fake], dim=1))
                loss_G_GAN = self.gan_loss(pred_fake, True)
                loss_G_feat = (official_feature_matching(pred_fake, pred_real, spec.n_layers_D, spec.num_D,
                                                         spec.lambda_feat)
                               if not spec.no_ganFeat_loss else fake.new_zeros(()))
                loss_G_VGG = (official_vgg_loss(self.vgg_loss.vgg, fake.float(), real) * spec.lambda_feat
                              if self.vgg_loss is not None else fake.new_zeros(()))
            values = self._read_losses({"G_GAN": loss_G_GAN, "G_GAN_Feat": loss_G_feat, "G_VGG": loss_G_VGG,
                                        "D_real": loss_D_real, "D_fake": loss_D_fake})
            self.on_phase("G backward")
            self.optimizer_G.zero_grad()
            self.scaler.scale(loss_G_GAN + loss_G_feat + loss_G_VGG).backward()
            self.on_phase("optimizer steps")
            self.scaler.step(self.optimizer_G)
            self.on_phase("D backward")
            self.optimizer_D.zero_grad()
            self.scaler.scale((loss_D_fake + loss_D_real) * 0.5).backward()
            self.on_phase("optimizer steps")
            self.scaler.step(self.optimizer_D)
            self.scaler.update()
            return values, fake.detach()

    return OfficialTrainStep
