"""FastNet: a small, wide, shallow CNN for fast CPU training on 32x32 and 64x64 images.

Design follows the fast CIFAR-10 training line (the DAWNBench ResNet-9 of Page, 2018, and Keller
Jordan's airbench, 2024): few, wide 3x3 conv layers; max-pooling right after the first conv of each
stage; BatchNorm; global max-pooling; a bias-free linear head whose logits are scaled down (this
keeps early training stable at high learning rates with label smoothing). Channel widths are the
main speed/accuracy knob: measured with `bench/train_speed.py`.

`fastnet_whitened` is the `cpu` preset's network, closer to airbench94 (Jordan, "94% on CIFAR-10 in 3.29
seconds on a single GPU", 2024): a frozen 2x2 patch-whitening stem initialised from the training data,
conv -> pool -> BN -> GELU blocks without a residual, BatchNorm scales fixed at 1, identity
(Dirac) initialisation of the convolutions and logits divided by 9. It is trained with the recipe
options of `TrainConfig` the `cpu` preset sets (lookahead, scaled bias learning rate, alternating flips).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


def _conv_bn(ci: int, co: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.GELU())


class FastStage(nn.Module):
    """conv -> max-pool -> conv, the second conv residual: halves resolution once."""

    def __init__(self, ci: int, co: int):
        super().__init__()
        self.conv1 = _conv_bn(ci, co)
        self.conv2 = _conv_bn(co, co)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        return x + self.conv2(x)


class _StagesAndHead:
    """What defenses read of a FastNet: its stages (`layers`) and its linear head (`linear`)."""

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.layers)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear


class FastNet(_StagesAndHead, nn.Module):
    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), stem_width: int = 32,
                 logit_scale: float = 0.125):
        super().__init__()
        self.stem = _conv_bn(3, stem_width)
        chans = [stem_width, *widths]
        self.layers = nn.ModuleList(FastStage(chans[i], chans[i + 1]) for i in range(len(widths)))
        self.linear = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward_features(self, x):
        x = self.stem(x)
        for stage in self.layers:
            x = stage(x)
        return F.adaptive_max_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.forward_features(x)) * self.logit_scale


@register_model
def fastnet(num_classes: int = 10, **kwargs) -> FastNet:
    """~ airbench94-sized widths: the `cpu` and `quick` presets' victim model."""
    return FastNet(num_classes, widths=(64, 256, 256), stem_width=32, **kwargs)


@register_model
def fastnet_small(num_classes: int = 10, **kwargs) -> FastNet:
    """Quarter-width FastNet for tests and the `smoke` preset."""
    return FastNet(num_classes, widths=(32, 64, 128), stem_width=16, **kwargs)


class _FixedScaleBN(nn.BatchNorm2d):
    """BatchNorm with its scale frozen at 1 (airbench: only the shift is learnt) and fast statistics."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class WhitenedStage(nn.Module):
    """conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU; the convs start as identities where
    the channel counts allow (Dirac init), which keeps the deep signal path clean at the start."""

    def __init__(self, ci: int, co: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ci, co, 3, padding=1, bias=False)
        self.norm1 = _FixedScaleBN(co)
        self.conv2 = nn.Conv2d(co, co, 3, padding=1, bias=False)
        self.norm2 = _FixedScaleBN(co)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):
            n = min(conv.in_channels, conv.out_channels)
            nn.init.dirac_(conv.weight.data[:n])

    def forward(self, x):
        x = self.act(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return self.act(self.norm2(self.conv2(x)))


class WhitenedFastNet(_StagesAndHead, nn.Module):
    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), whiten_eps: float = 5e-4):
        super().__init__()
        # 2x2 patches of 3 channels: 12 eigen-directions, each kept with both signs (GELU follows).
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.whiten_eps = whiten_eps
        self.register_buffer("whitened", torch.zeros((), dtype=torch.bool))
        self.act = nn.GELU()
        chans = [24, *widths]
        self.layers = nn.ModuleList(WhitenedStage(chans[i], chans[i + 1]) for i in range(len(widths)))
        self.linear = nn.Linear(widths[-1], num_classes, bias=False)

    @property
    def needs_data_init(self) -> bool:
        return not bool(self.whitened)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Set the stem to whiten 2x2 patches of `x` (normalised images): project on the
        eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue). Once per model: a
        trained or loaded model (whose `whitened` flag is set) is left as it is. The stem does not
        subtract the patch mean (as in airbench): inputs must be normalised with their dataset's
        statistics, as `Classifier` does, or directions of small variance start far off zero and
        their GELUs dead."""
        if not self.needs_data_init:
            return
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        patches = patches - patches.mean(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        w = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0).view(-1, 1) + self.whiten_eps)).view(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([w, -w]).to(self.whiten.weight))
        self.whitened.fill_(True)

    def forward_features(self, x):
        x = self.act(self.whiten(x))
        for stage in self.layers:
            x = stage(x)
        return F.adaptive_max_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.forward_features(x)) / 9


@register_model
def fastnet_whitened(num_classes: int = 10, **kwargs) -> WhitenedFastNet:
    """airbench94-style network: the `cpu` preset's victim model (see `TrainConfig` for its recipe)."""
    return WhitenedFastNet(num_classes, **kwargs)
