"""`Classifier`: a network plus its input normalisation, taking uint8 or [0, 1] float images.

Attacks, CLIP and the harness all work on [0, 1] pixels; normalising inside the wrapper means no
caller can forget it or use another dataset's statistics. `net` is the bare architecture, whose state
dict is exactly BackdoorBench's for the models both have.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def normalize_images(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images (B, 3, H, W) -> standardised with per-channel `mean`, `std` (1, 3, 1, 1)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return (x - mean) / std


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, mean, std, arch: str = ""):
        super().__init__()
        self.net = net
        self.arch = arch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_images(x, self.mean, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    @property
    def needs_data_init(self) -> bool:
        """Whether the net has a data-dependent initialisation (e.g. a whitening stem) not yet done."""
        return getattr(self.net, "needs_data_init", False)

    def init_from_data(self, images: torch.Tensor) -> None:
        self.net.init_from_data(self.normalize(images))

    @property
    def classifier(self) -> nn.Linear:
        return self.net.classifier

    @property
    def stages(self) -> list[nn.Module]:
        return self.net.stages
