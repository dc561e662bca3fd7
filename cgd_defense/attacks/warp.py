"""WaNet's warping trigger (Nguyen & Tran, "WaNet: Imperceptible Warping-based Backdoor Attack",
ICLR 2021, Sec. 3.2): every poisoned image is resampled through one fixed, smooth warping field.

The field: a k x k grid of random 2-D offsets in [-1, 1], normalised to mean magnitude 1, upsampled
bicubically to the image size; the sampling grid is `clamp((identity + s * field / H) * grid_rescale)`
in grid_sample's [-1, 1] coordinates, so with s = 0.5 no pixel moves by more than about s * max|field| / 2
pixels. "Noise" (cross) samples are warped by the same grid plus independent per-pixel offsets
uniform in [-1/H, 1/H] (half a pixel), and keep their true label; they stop the network from
learning "any warping means the target" (paper Sec. 3.3, `cross_ratio` 2 in BackdoorBench).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import StrictModel
from .triggers import TriggerKind, register_trigger


@register_trigger("warp")
class WarpTrigger(TriggerKind):
    """Smooth warping (WaNet). Defaults are BackdoorBench's CIFAR-10 ones: k 4, s 0.5, grid_rescale 1.
    Test-time `strength` scales s."""

    class Params(StrictModel):
        k: int = Field(4, ge=2, le=64, description="control-grid size of the random field")
        s: float = Field(0.5, ge=0, le=16, description="warping strength")
        grid_rescale: float = Field(1.0, gt=0, le=2, description="scale of the sampling grid (WaNet's grid_rescale)")
        seed: int = Field(0, description="seeds the warping field")

    def __init__(self, params, image_size, attack_seed=0, noise: bool = False):
        super().__init__(params, image_size, attack_seed)
        if params.k > image_size:
            raise ValueError(f"warp: k = {params.k} exceeds the image size {image_size}")
        self.noise = noise
        g = torch.Generator().manual_seed(params.seed)
        control = torch.rand(1, 2, params.k, params.k, generator=g) * 2 - 1
        control = control / control.abs().mean()
        # (1, H, W, 2): per-pixel offset in grid units, last axis (column, row) as grid_sample expects
        self.field = F.interpolate(control, size=(image_size, image_size), mode="bicubic",
                                   align_corners=True).permute(0, 2, 3, 1)
        axis = torch.linspace(-1, 1, image_size)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        self.identity = torch.stack((cols, rows), dim=-1).unsqueeze(0)

    def cross_variant(self) -> "WarpTrigger":
        """The component for WaNet's noise samples: the same field plus per-image random jitter."""
        return WarpTrigger(self.params, self.image_size, self.attack_seed, noise=True)

    def grid(self, strength: float = 1.0) -> torch.Tensor:
        p, n = self.params, self.image_size
        return ((self.identity + p.s * strength * self.field / n) * p.grid_rescale).clamp(-1, 1)

    def _jitter(self, indices: torch.Tensor) -> torch.Tensor:
        n = self.image_size
        out = torch.empty(len(indices), n, n, 2)
        for row, i in enumerate(indices.tolist()):
            g = torch.Generator().manual_seed(self.params.seed * 1_000_003 + i)
            out[row] = torch.rand(n, n, 2, generator=g) * 2 - 1
        return out / n

    def apply(self, x, indices, train, strength=1.0):
        grid = self.grid(strength).expand(len(x), -1, -1, -1)
        if self.noise:
            grid = (grid + self._jitter(indices)).clamp(-1, 1)
        return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="border", align_corners=True)
