"""FastNet: a small, wide, shallow CNN for fast CPU training on 32x32 and 64x64 images.

Design follows the fast CIFAR-10 training line (the DAWNBench ResNet-9 of Page, 2018, and Keller
Jordan's airbench, 2024): few, wide 3x3 conv layers; max-pooling right after the first conv of each
stage; BatchNorm; global max-pooling; a bias-free linear head whose logits are scaled down (this
keeps early training stable at high learning rates with label smoothing). Channel widths are the
main speed/accuracy knob: measured with `bench/train_speed.py`.
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


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), stem_width: int = 32,
                 logit_scale: float = 0.125):
        super().__init__()
        self.stem = _conv_bn(3, stem_width)
        chans = [stem_width, *widths]
        self.layers = nn.ModuleList(FastStage(chans[i], chans[i + 1]) for i in range(len(widths)))
        self.linear = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.layers)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

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
