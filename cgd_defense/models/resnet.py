"""ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), as used for 32x32 images, and the
four-stage layout it shares with PreActResNet-18."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class CifarResNet(nn.Module):
    """The CIFAR ResNet layout: a 3x3 stem, four stages of `block` (widths w, 2w, 4w, 8w; strides 1,
    2, 2, 2), global average pooling and `linear`. A subclass sets `block`, builds its stem in
    `__init__` before calling `_add_stages_and_head` (so parameters keep their registration order),
    and defines `stem`."""

    block: type[nn.Module]

    def _add_stages_and_head(self, num_blocks, num_classes: int, width: int) -> None:
        self.in_planes = width
        for i, (multiple, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2))):
            setattr(self, f"layer{i + 1}", self._make_layer(width * multiple, num_blocks[i], stride))
        self.linear = nn.Linear(width * 8, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(self.block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def stem(self, x):
        raise NotImplementedError

    def forward_features(self, x):
        out = self.stem(x)
        for stage in self.stages:
            out = stage(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.forward_features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(CifarResNet):
    block = BasicBlock

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self._add_stages_and_head(num_blocks, num_classes, width)

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))


@register_model
def resnet18(num_classes: int = 10, **kwargs) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, **kwargs)
