"""Losses for video tokenizer training: reconstruction (L1 + L2), a pluggable perceptual loss and a PatchGAN
adversarial loss (hinge or non-saturating) that switches on at a given step.

Every loss takes videos (B, C, T, H, W) in [0, 1], the tokenizer's convention.
"""

import importlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

GAN_LOSSES = ("hinge", "non_saturating")
DISCRIMINATOR_KINDS = ("3d", "2d")


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0,
                        l2_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`l1_weight * mean|x - y| + l2_weight * mean (x - y)^2`, computed in float32; also returns the two terms."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ in "
                         "shape")
    diff = reconstruction.float() - target.float()
    l1, l2 = diff.abs().mean(), diff.square().mean()
    return l1_weight * l1 + l2_weight * l2, {"l1": l1.detach(), "l2": l2.detach()}


# ------------------------------------------------------------------------------------------- perceptual
class PerceptualLoss(nn.Module):
    """Frame-wise perceptual distance through a frozen network.

    `network(a, b)` takes two image batches (N, 3, H, W) in [-1, 1] (the LPIPS convention) and returns one distance
    per image (N,) or (N, 1, 1, 1); the loss is their mean over all frames of all videos. The network keeps the
    mode it was given in (put it in eval mode before; exported programs cannot switch)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        for param in network.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True):
        self.training = mode  # never propagated to the frozen network
        return self

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        def frames(video):  # (B, C, T, H, W) in [0, 1] -> (B*T, C, H, W) in [-1, 1]
            return video.transpose(1, 2).flatten(0, 1) * 2 - 1

        distance = self.network(frames(reconstruction), frames(target.to(reconstruction.dtype)))
        return distance.float().mean()


def load_perceptual_model(spec: str) -> PerceptualLoss | None:
    """`--perceptual_model`:
      * "none": no perceptual loss;
      * a `torch.export` program (.pt2: `torch.export.save` of the network exported in eval mode, with dynamic
        batch and image sizes);
      * a TorchScript file (.pt/.pth/.ts/.jit, `torch.jit.load`; a TorchScript archive runs code, so only load
        files you trust);
      * "package.module:factory", a function returning the network (e.g. your own LPIPS wrapper).
    No weights ship with nbp-video and none are downloaded."""
    if spec in (None, "", "none"):
        return None
    if spec.lower().endswith((".pt2", ".pt", ".pth", ".ts", ".jit")):
        if not os.path.isfile(spec):
            raise ValueError(f"--perceptual_model {spec!r}: no such file")
        if spec.lower().endswith(".pt2"):
            return PerceptualLoss(torch.export.load(spec).module())
        return PerceptualLoss(torch.jit.load(spec, map_location="cpu").eval())
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--perceptual_model must be 'none', a .pt2 / TorchScript file or 'package.module:factory'; "
                         f"got {spec!r}")
    network = getattr(importlib.import_module(module_name), attr)()
    if not isinstance(network, nn.Module):
        raise TypeError(f"--perceptual_model {spec!r} returned {type(network).__name__}, not a torch.nn.Module")
    return PerceptualLoss(network.eval())


# ---------------------------------------------------------------------------------------- discriminator
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix layout: strided 4x4 convs, channels doubling up to 8x) that scores
    overlapping patches of a video as real or fake.

    kind "3d": 3D convs over (T, H, W) with kernels (3, 4, 4), downsampling only in space, so clips of any
    length work; logits (B, 1, T, h, w). kind "2d": the 2D PatchGAN applied to every frame; logits (B*T, 1, h, w).
    GroupNorm replaces BatchNorm, so the scores of one clip never depend on the rest of the batch (and DDP needs
    no synchronised batch statistics). Input videos are in [0, 1].
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, kind: str = "3d"):
        super().__init__()
        if kind not in DISCRIMINATOR_KINDS:
            raise ValueError(f"discriminator `kind` must be one of {DISCRIMINATOR_KINDS}, got {kind!r}")
        if num_layers < 1 or base_channels < 1:
            raise ValueError(f"need num_layers >= 1 and base_channels >= 1, got {num_layers}, {base_channels}")
        self.kind = kind

        def conv(c_in, c_out, stride, bias=True):
            if kind == "2d":
                return nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=bias)
            return nn.Conv3d(c_in, c_out, (3, 4, 4), stride=(1, stride, stride), padding=1, bias=bias)

        layers = [conv(in_channels, base_channels, 2), nn.LeakyReLU(0.2)]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            # no bias before a norm layer, which would cancel it
            layers += [conv(channels, out, 2 if n < num_layers else 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(conv(channels, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5:
            raise ValueError(f"`video` must be (B, C, T, H, W), got shape {tuple(video.shape)}")
        x = video * 2 - 1
        if self.kind == "2d":
            x = x.transpose(1, 2).flatten(0, 1)
        return self.layers(x)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """hinge: (mean relu(1 - real) + mean relu(1 + fake)) / 2; non_saturating: (mean softplus(-real) +
    mean softplus(fake)) / 2 (binary cross-entropy with logits). Computed in float32 whatever the logits' dtype."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        real, fake = F.relu(1 - real_logits), F.relu(1 + fake_logits)
    elif kind == "non_saturating":
        real, fake = F.softplus(-real_logits), F.softplus(fake_logits)
    else:
        raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")
    return 0.5 * (real.mean() + fake.mean())


def generator_adversarial_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """hinge: -mean(fake); non_saturating: mean softplus(-fake). Computed in float32 whatever the logits' dtype."""
    fake_logits = fake_logits.float()
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def adversarial_active(step: int, disc_start_step: int) -> bool:
    """The discriminator and the generator's adversarial term are off for optimizer steps 0 .. disc_start_step - 1."""
    return step >= disc_start_step


__all__ = ["DISCRIMINATOR_KINDS", "GAN_LOSSES", "PatchDiscriminator", "PerceptualLoss", "adversarial_active",
           "discriminator_loss", "generator_adversarial_loss", "load_perceptual_model", "reconstruction_loss"]
