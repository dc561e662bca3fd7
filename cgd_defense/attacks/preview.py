"""Look at an attack before training on it: how many samples it poisons, how far its trigger moves
the pixels (L_inf, L_2, SSIM), and a PNG grid of clean vs triggered images with the residual magnified.

Used by `cgd-bench attacks preview NAME --out DIR`. The training-time trigger and the test-time trigger
are reported separately, since they may differ (Adaptive-Blend's full test trigger, the colour shift
that activates a clean-image attack whose training images are untouched).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.datasets import ImageData
from ..harness.cache import Cache
from ..harness.presets import Preset
from .poison import FitContext, apply_components, build_components, poison_training_set, trigger_test_set
from .spec import AttackSpec

CELL = 96          # pixels per image in the grid (nearest-neighbour upscaled)
HEADER = 18        # pixels of column titles


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) mean structural similarity of images in [0, 1] (Wang et al., IEEE TIP 2004: 11x11 Gaussian
    window, sigma 1.5, K1 0.01, K2 0.03), computed per channel and averaged; 1 means identical."""
    c = a.shape[1]
    size = min(11, a.shape[-1])
    w = _gaussian_window(size).to(a).expand(c, 1, size, size)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a ** 2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b ** 2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@dataclass
class Distortion:
    n: int
    linf: float   # mean over images of max |x' - x|, pixels in [0, 1]
    l2: float     # mean over images of ||x' - x||_2 over all pixels and channels, pixels in [0, 1]
    ssim: float   # mean SSIM(x, x')


def distortion(clean_u8: torch.Tensor, modified_u8: torch.Tensor, batch_size: int = 2048) -> Distortion:
    n = len(clean_u8)
    if n == 0:
        return Distortion(0, math.nan, math.nan, math.nan)
    linf = l2 = sim = 0.0
    for start in range(0, n, batch_size):
        a = clean_u8[start:start + batch_size].float() / 255
        b = modified_u8[start:start + batch_size].float() / 255
        d = (b - a).flatten(1)
        linf += float(d.abs().max(1).values.sum())
        l2 += float(d.norm(dim=1).sum())
        sim += float(ssim(a, b).sum())
    return Distortion(n, linf / n, l2 / n, sim / n)


@dataclass
class PreviewReport:
    attack: str
    n_train: int
    n_poisoned: int
    poison_ratio: float
    n_cross: int
    n_labels_changed: int
    train_trigger: Distortion      # over the poisoned training images
    cross_trigger: Distortion      # over the cross (noise / cover) training images
    test_trigger: Distortion       # over the triggered test images
    residual_gain: dict[str, float]
    grid: str

    def lines(self) -> list[str]:
        def fmt(d: Distortion) -> str:
            if d.n == 0:
                return "none"
            return f"L_inf {d.linf:.4f}  L_2 {d.l2:.3f}  SSIM {d.ssim:.4f}  (mean over {d.n} images, pixels in [0, 1])"
        return [
            f"{self.attack}: {self.n_poisoned} of {self.n_train} training images poisoned "
            f"(ratio {self.poison_ratio:.4f}), {self.n_cross} cross, {self.n_labels_changed} labels changed",
            f"train trigger: {fmt(self.train_trigger)}",
            f"cross trigger: {fmt(self.cross_trigger)}",
            f"test trigger:  {fmt(self.test_trigger)}",
        ]


def _grid_images(spec: AttackSpec, train: ImageData, per_class: int, seed: int, fit: FitContext | None = None):
    """`per_class` training images of each class (seeded), with the training and the test trigger."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(train.num_classes):
        idx = torch.nonzero(train.labels == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    idx = torch.cat(chosen)
    size = train.images.shape[-1]
    clean = train.images[idx]
    train_trig = apply_components(build_components(spec, size, True, fit), clean, idx, train=True)
    test_trig = apply_components(build_components(spec, size, False, fit), clean, idx + 10_000_000, train=False,
                                 strength=spec.test.strength)
    return idx, clean, train_trig, test_trig


def _magnified(clean_u8: torch.Tensor, triggered_u8: torch.Tensor) -> tuple[torch.Tensor, float]:
    """|x' - x| scaled so the largest residual shown is white; returns the images and the gain."""
    r = (triggered_u8.float() - clean_u8.float()).abs()
    peak = float(r.max())
    gain = 255 / peak if peak > 0 else 1.0
    return (r * gain).round().clamp(0, 255).to(torch.uint8), gain


def write_grid(path: Path, columns: list[tuple[str, torch.Tensor]], row_labels: list[str]) -> None:
    """A PNG: one row per image, one column per (title, uint8 images) pair, upscaled to CELL pixels."""
    from PIL import Image, ImageDraw

    n_rows, n_cols = len(row_labels), len(columns)
    label_w = 90
    sheet = Image.new("RGB", (label_w + n_cols * CELL, HEADER + n_rows * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (title, _) in enumerate(columns):
        draw.text((label_w + j * CELL + 3, 3), title, fill="black")
    for i, label in enumerate(row_labels):
        draw.text((3, HEADER + i * CELL + CELL // 2 - 5), label, fill="black")
        for j, (_, imgs) in enumerate(columns):
            tile = Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).resize((CELL, CELL), Image.NEAREST)
            sheet.paste(tile, (label_w + j * CELL, HEADER + i * CELL))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def preview_fit_context(train: ImageData, preset: Preset, cache: Cache, device: str | None = None) -> FitContext:
    """What learned triggers fit on in a preview: the harness's split of `train` into the victim's pool
    and the public split (the same seeded split a run makes), so a preview at a preset and a run at that
    preset share the fitted trigger in the cache."""
    from ..data.splits import stratified_holdout
    from ..harness.pipeline import PUBLIC_SPLIT_SEED  # deferred: the pipeline imports the attacks

    pool_idx, public_idx = stratified_holdout(train.labels, preset.public_fraction, PUBLIC_SPLIT_SEED)
    return FitContext(train.subset(pool_idx), cache, preset,
                      public=train.subset(public_idx) if len(public_idx) else None, device=device)


def preview_attack(spec: AttackSpec, train: ImageData, test: ImageData, out_dir: str | Path,
                   per_class: int = 2, seed: int = 0, fit: FitContext | None = None) -> PreviewReport:
    """Poison `train` as a run would, measure the triggers' distortion, and write
    `out_dir/preview.png` (clean | train trigger | residual | test trigger | residual, `per_class`
    images per class) and `out_dir/preview.json` (this report). Learned triggers are fitted on `fit`
    first (see `preview_fit_context`), or read from its cache."""
    out_dir = Path(out_dir)
    poisoned = poison_training_set(spec, train, fit)
    triggered = trigger_test_set(spec, test, fit)
    cross = poisoned.cross_mask
    idx, clean, train_trig, test_trig = _grid_images(spec, train, per_class, seed, fit)
    train_res, train_gain = _magnified(clean, train_trig)
    test_res, test_gain = _magnified(clean, test_trig)
    grid = out_dir / "preview.png"
    write_grid(grid, [("clean", clean), ("train trigger", train_trig), (f"|diff| x{train_gain:.0f}", train_res),
                      ("test trigger", test_trig), (f"|diff| x{test_gain:.0f}", test_res)],
               [f"{i}: {train.classes[int(train.labels[i])]}"[:14] for i in idx.tolist()])
    report = PreviewReport(
        attack=spec.name, n_train=len(train), n_poisoned=int(poisoned.poison_mask.sum()),
        poison_ratio=float(poisoned.poison_mask.float().mean()), n_cross=int(cross.sum()),
        n_labels_changed=int((poisoned.labels != poisoned.original_labels).sum()),
        train_trigger=distortion(train.images[poisoned.poison_mask], poisoned.images[poisoned.poison_mask]),
        cross_trigger=distortion(train.images[cross], poisoned.images[cross]),
        test_trigger=distortion(test.images[triggered.indices], triggered.images),
        residual_gain={"train": train_gain, "test": test_gain}, grid=str(grid))
    (out_dir / "preview.json").write_text(json.dumps(asdict(report), indent=2))
    return report
