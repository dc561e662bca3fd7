"""The CGD entropy map: each training sample at (CLIP NLL rank, suspicious-model NLL rank), coloured
by the ground truth, with the split's thresholds and per-category marginal histograms.

The defense never reads the ground truth; the harness (or `cgd-bench cgd map RUN_DIR`) draws the
figure afterwards from the split's saved scores and the poison masks it holds.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .cgd_split import rank_normalize

CATEGORIES = (  # (label, colour, drawing order: later on top)
    ("clean", "#9e9e9e"),
    ("trigger noise (label kept)", "#1f77b4"),
    ("clean-label poisoned", "#ff9800"),
    ("poisoned", "#d62728"),
)


def entropy_ranks(scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_clip, r_susp) exactly as the split computed them: the split stores the suspicious score as
    -NLL (higher = more suspicious), and negating it back is exact."""
    return rank_normalize(scores["clip_nll"].double()), rank_normalize(-scores["suspicious_neg_nll"].double())


def draw_entropy_map(scores: dict[str, torch.Tensor], thresholds: dict[str, float], poison_mask: torch.Tensor,
                     clean_label_mask: torch.Tensor, path: str | os.PathLike, title: str,
                     noise_mask: torch.Tensor | None = None) -> Path:
    """Write the entropy map PNG to `path`. `thresholds` holds sigma1 and sigma2; `clean_label_mask`
    marks poisons that keep their true label; `noise_mask` marks trigger-noise samples (WaNet cross)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r_clip, r_susp = (r.numpy() for r in entropy_ranks(scores))
    poison = poison_mask.bool()
    clean_label = clean_label_mask.bool() & poison
    noise = noise_mask.bool() & ~poison if noise_mask is not None else torch.zeros_like(poison)
    masks = {"clean": ~poison & ~noise, "trigger noise (label kept)": noise,
             "clean-label poisoned": clean_label, "poisoned": poison & ~clean_label}
    s1, s2 = float(thresholds["sigma1"]), float(thresholds["sigma2"])

    fig = plt.figure(figsize=(7.5, 7.5))
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    n = len(r_clip)
    size = max(0.5, min(8.0, 20000 / max(n, 1)))
    bins = torch.linspace(0, 1, 41).numpy()
    for label, colour in CATEGORIES:
        m = masks[label].numpy()
        if not m.any():
            continue
        ax.scatter(r_clip[m], r_susp[m], s=size, c=colour, alpha=0.6, linewidths=0, rasterized=True,
                   label=f"{label} ({int(m.sum())})")
        top.hist(r_clip[m], bins=bins, density=True, histtype="step", color=colour, linewidth=1.5)
        right.hist(r_susp[m], bins=bins, density=True, histtype="step", color=colour, linewidth=1.5,
                   orientation="horizontal")
    ax.axvspan(0, 1 - s1, ymin=s1, ymax=1, color="#2e7d32", alpha=0.06, lw=0)
    for a in (ax, top):
        a.axvline(1 - s1, color="#2e7d32", ls="--", lw=1)
        a.axvline(1 - s2, color="#b71c1c", ls=":", lw=1.2)
    for a in (ax, right):
        a.axhline(s1, color="#2e7d32", ls="--", lw=1)
        a.axhline(s2, color="#b71c1c", ls=":", lw=1.2)
    ax.plot([], [], color="#2e7d32", ls="--", label=f"clean part: x <= {1 - s1:.3g}, y >= {s1:.3g}")
    ax.plot([], [], color="#b71c1c", ls=":", label=f"suspects: x > {1 - s2:.3g} or y < {s2:.3g}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("CLIP NLL rank (high: CLIP disagrees with the label)")
    ax.set_ylabel("suspicious-model NLL rank (low: learned too easily)")
    ax.legend(loc="upper left", fontsize=7, markerscale=3, framealpha=0.85)
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_ylabel("density", fontsize=8)
    right.set_xlabel("density", fontsize=8)
    top.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_from_split_file(split_file: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Redraw the entropy map from a run folder's `split.pt` (written by the harness)."""
    from ..errors import CGDError

    split_file = Path(split_file)
    if not split_file.is_file():
        raise CGDError(f"{split_file}: no split file (runs of split-based defenses write split.pt into the run folder)")
    saved = torch.load(split_file, map_location="cpu", weights_only=True)
    split, gt = saved["split"], saved["ground_truth"]
    if "clip_nll" not in split["scores"] or "thresholds" not in split["info"]:
        raise CGDError(f"{split_file}: not a CGD split (defense '{saved.get('defense')}' saved no CGD scores)")
    return draw_entropy_map(split["scores"], split["info"]["thresholds"], gt["poison_mask"],
                            gt["poison_mask"] & bool(gt["clean_label"]), out or split_file.with_name("entropy_map.png"),
                            entropy_map_title(split["info"], gt), noise_mask=gt.get("cross_mask"))


def entropy_map_title(info: dict, gt: dict) -> str:
    th = info.get("thresholds", {})
    return (f"{gt.get('attack', '?')} | CGD {info.get('variant', '?')} | {info.get('clip_source', '?')}\n"
            f"sigma1={th.get('sigma1', float('nan')):.3g}, sigma2={th.get('sigma2', float('nan')):.3g} "
            f"({th.get('source', '?')})")
