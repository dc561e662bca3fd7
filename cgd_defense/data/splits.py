"""Seeded, stratified splits of a training set. The test set is never split or consulted.

- `validation split`: held out of the training data for every early-stopping and model-selection
  decision in the project (the CGD reference code stops on test accuracy; we do not).
- `public split`: held out of the training data to train a stand-in CLIP; the victim never sees it.
"""
from __future__ import annotations

import torch


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (kept, held_out) index tensors, `fraction` of every class held out, sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n_held = int(round(fraction * len(idx)))
        held.append(idx[torch.randperm(len(idx), generator=g)[:n_held]])
    held_idx = torch.sort(torch.cat(held)).values if held else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return torch.nonzero(mask).flatten(), held_idx
