"""Batched tensor augmentation: random crop with zero or reflect padding and horizontal flip, on a
whole batch at once (no per-image Python transforms), driven by an explicit generator for
reproducibility."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator, *,
                     pad_mode: str = "zeros", flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`x`: (B, C, H, W) float. Equivalent to torchvision's RandomCrop(H, padding) + RandomHorizontalFlip
    applied independently to each image. `flip_mask` (B,) bool flips exactly those images instead."""
    b, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding), mode="constant" if pad_mode == "zeros" else pad_mode)
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(x.device)  # (B, H)
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(x.device)  # (B, W)
        bidx = torch.arange(b, device=x.device).view(b, 1, 1)
        # advanced indexing: (B, H, W, C) -> back to (B, C, H, W)
        x = padded.permute(0, 2, 3, 1)[bidx, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)
    if flip_mask is None and flip:
        flip_mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    if flip_mask is not None:
        x = torch.where(flip_mask.view(b, 1, 1, 1), x.flip(3), x)
    return x.contiguous()
