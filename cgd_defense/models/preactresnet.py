"""PreActResNet-18 (He et al., ECCV 2016), the model of the CGD paper and BackdoorBench.

Module names, parameter order and forward follow BackdoorBench's `models/preact_resnet.py` (conv1,
layer1..4 of PreActBlock with bn1/conv1/bn2/conv2/shortcut, then average pooling and `linear`, with
no final BN/ReLU): its state dict (102 keys for CIFAR-10) moves between the two frameworks unchanged.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model
from .resnet import CifarResNet


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(CifarResNet):
    block = PreActBlock

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self._add_stages_and_head(num_blocks, num_classes, width)

    def stem(self, x):
        return self.conv1(x)


@register_model
def preactresnet18(num_classes: int = 10, **kwargs) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, **kwargs)
