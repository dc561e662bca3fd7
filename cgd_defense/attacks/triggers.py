"""Trigger kinds: each a registered class with a pydantic parameter schema and an `apply` function.

`apply(x, indices, train)` takes float images in [0, 1] of shape (B, 3, H, W) and the images' indices
in their split (for per-image randomness that is reproducible: e.g. a random patch location is a
function of (seed, index), not of batch order), and returns the triggered images. Components of an
attack are applied in the order listed, so composing two components is function composition.
Learned triggers (issue: attack library II) add a `fit` step whose output is cached.

Kinds live here (none, patch, blend, sig) and in sibling modules (warp.py: WaNet; natural.py: the
natural feature of clean-image attacks); `cgd_defense/attacks/__init__.py` imports them all, which is
what fills the registry. A kind may also define `cross_variant()` (the component used for "cross" /
noise samples, kept at their true label; WaNet) and `feature_value(x)` (a natural feature that clean
images can already carry; see `poisoning.select: natural-feature`).
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..config import StrictModel, unknown_name_error

_TRIGGER_KINDS: dict[str, type["TriggerKind"]] = {}


def register_trigger(name: str):
    def deco(cls: type["TriggerKind"]):
        if name in _TRIGGER_KINDS:
            raise ValueError(f"trigger kind '{name}' is already registered")
        cls.kind = name
        _TRIGGER_KINDS[name] = cls
        return cls
    return deco


def list_trigger_kinds() -> list[str]:
    return sorted(_TRIGGER_KINDS)


def get_trigger_kind(name: str) -> type["TriggerKind"]:
    if name not in _TRIGGER_KINDS:
        raise unknown_name_error("trigger kind", name, _TRIGGER_KINDS)
    return _TRIGGER_KINDS[name]


class TriggerKind:
    kind: ClassVar[str]

    class Params(StrictModel):
        pass

    def __init__(self, params: "TriggerKind.Params", image_size: int, attack_seed: int = 0):
        self.params = params
        self.image_size = image_size
        self.attack_seed = attack_seed

    def apply(self, x: torch.Tensor, indices: torch.Tensor, train: bool, strength: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Pattern helpers

def _pattern(kind: str, size: int, seed: int) -> torch.Tensor:
    """A (3, size, size) pattern in [0, 1]."""
    if kind == "white":
        return torch.ones(3, size, size)
    if kind == "black":
        return torch.zeros(3, size, size)
    if kind == "checkerboard":
        ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        return ((ii + jj) % 2 == 0).float().expand(3, size, size).clone()
    if kind == "random":
        return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown pattern '{kind}'")


def _load_image(path: str, size: int) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


# ----------------------------------------------------------------------------------------------


@register_trigger("none")
class NoTrigger(TriggerKind):
    """No pixel change: label-only (clean-image) attacks."""

    def apply(self, x, indices, train, strength=1.0):
        return x


@register_trigger("patch")
class PatchTrigger(TriggerKind):
    """Paste a square pattern (BadNets, Gu et al. 2017) at a fixed corner, fixed coordinates, or a
    random location per image (seeded by the image index)."""

    class Params(StrictModel):
        pattern: Literal["white", "black", "checkerboard", "random", "image"] = "white"
        image: str | None = Field(None, description="path of a pattern image, with pattern: image")
        size: int = Field(3, ge=1, le=64)
        location: Literal["bottom-right", "bottom-left", "top-right", "top-left", "center", "random", "xy"] = "bottom-right"
        xy: tuple[int, int] | None = Field(None, description="top-left (x, y), with location: xy")
        margin: int = Field(0, ge=0)
        seed: int = 0

        @model_validator(mode="after")
        def _check(self):
            if self.pattern == "image" and not self.image:
                raise ValueError("pattern 'image' needs an 'image' file path")
            if self.location == "xy" and self.xy is None:
                raise ValueError("location 'xy' needs 'xy: [x, y]'")
            return self

    def __init__(self, params, image_size, attack_seed=0):
        super().__init__(params, image_size, attack_seed)
        p = params
        if p.size > image_size:
            raise ValueError(f"patch size {p.size} exceeds image size {image_size}")
        self.pattern = _load_image(p.image, p.size) if p.pattern == "image" else _pattern(p.pattern, p.size, p.seed)

    def _corner(self) -> tuple[int, int]:
        p, s, n = self.params, self.params.size, self.image_size
        far = n - s - p.margin
        return {"bottom-right": (far, far), "bottom-left": (p.margin, far), "top-right": (far, p.margin),
                "top-left": (p.margin, p.margin), "center": ((n - s) // 2, (n - s) // 2)}[p.location]

    def apply(self, x, indices, train, strength=1.0):
        s = self.params.size
        x = x.clone()
        pattern = self.pattern.to(x)
        if self.params.location == "random":
            n = self.image_size - s + 1
            for row, i in enumerate(indices.tolist()):
                g = torch.Generator().manual_seed(self.params.seed * 1_000_003 + i)
                px, py = torch.randint(0, n, (2,), generator=g).tolist()
                x[row, :, py:py + s, px:px + s] = pattern
            return x
        px, py = self.params.xy if self.params.location == "xy" else self._corner()
        region = x[:, :, py:py + s, px:px + s]
        x[:, :, py:py + s, px:px + s] = region + strength * (pattern - region) if strength != 1 else pattern
        return x


@register_trigger("blend")
class BlendTrigger(TriggerKind):
    """x' = (1 - alpha) x + alpha t (Blended, Chen et al. 2017), t an image, seeded noise or a pattern,
    optionally only inside a rectangular region.

    Patch-wise partial blending (Adaptive-Blend, Qi et al., ICLR 2023, Sec. 4): the image is cut into
    `pieces` equal cells (a square grid) and, per image, a seeded random `mask_rate` share of them is
    left unblended, so no single poisoned image carries the whole trigger. The authors' code uses 16
    pieces and mask rate 0.5 at training time and the full trigger (mask rate 0) at test time."""

    class Params(StrictModel):
        source: Literal["image", "noise", "pattern"] = "noise"
        image: str | None = None
        pattern: Literal["white", "black", "checkerboard", "random"] = "random"
        alpha: float = Field(0.2, gt=0, le=1)
        seed: int = 0
        region: tuple[int, int, int, int] | None = Field(None, description="(x, y, width, height)")
        pieces: int = Field(1, ge=1, le=1024, description="square grid of cells for partial blending")
        mask_rate: float = Field(0.0, ge=0, lt=1, description="share of cells left unblended per image")

        @model_validator(mode="after")
        def _check(self):
            if self.source == "image" and not self.image:
                raise ValueError("source 'image' needs an 'image' file path")
            if math.isqrt(self.pieces) ** 2 != self.pieces:
                raise ValueError(f"'pieces' must be a perfect square (1, 4, 9, 16, ...); got {self.pieces}")
            return self

    def __init__(self, params, image_size, attack_seed=0):
        super().__init__(params, image_size, attack_seed)
        p = params
        if p.source == "image":
            self.target = _load_image(p.image, image_size)
        elif p.source == "noise":
            self.target = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(p.seed))
        else:
            self.target = _pattern(p.pattern, image_size, p.seed)
        self.mask = torch.ones(1, image_size, image_size)
        if p.region is not None:
            rx, ry, rw, rh = p.region
            self.mask.zero_()
            self.mask[:, ry:ry + rh, rx:rx + rw] = 1
        side = math.isqrt(p.pieces)
        if side > image_size:
            raise ValueError(f"blend: {p.pieces} pieces need an image of at least {side}x{side} pixels")
        self.cell_edges = [(i * image_size) // side for i in range(side + 1)]
        self.masked_pieces = round(p.mask_rate * p.pieces)

    def piece_mask(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W): 1 where the trigger is blended, 0 on each image's `masked_pieces` left-out cells,
        chosen by a generator seeded with (seed, image index)."""
        side, edges, n = math.isqrt(self.params.pieces), self.cell_edges, self.image_size
        out = torch.ones(len(indices), 1, n, n)
        for row, i in enumerate(indices.tolist()):
            g = torch.Generator().manual_seed(self.params.seed * 1_000_003 + i)
            for cell in torch.randperm(self.params.pieces, generator=g)[:self.masked_pieces].tolist():
                r, c = divmod(cell, side)
                out[row, :, edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 0
        return out

    def apply(self, x, indices, train, strength=1.0):
        alpha = min(1.0, self.params.alpha * strength)
        t, m = self.target.to(x), self.mask.to(x)
        if self.masked_pieces:
            m = m * self.piece_mask(indices).to(x)
        return x + alpha * m * (t - x)


@register_trigger("sig")
class SinusoidalSignal(TriggerKind):
    """SIG (Barni, Kallas & Tondi, ICIP 2019): add the horizontal sinusoidal signal
    v(i, j) = delta * sin(2 pi j f / W) to every row (j the column, W the width), then clip.
    `delta` is on the 0-255 pixel scale, as in the paper and BackdoorBench (delta 40, f 6 on
    CIFAR-10). Test-time `strength` scales delta."""

    class Params(StrictModel):
        delta: float = Field(40, gt=0, le=255, description="amplitude on the 0-255 pixel scale")
        frequency: float = Field(6, gt=0, le=64, description="periods across the image width")

    def signal(self, width: int) -> torch.Tensor:
        j = torch.arange(width, dtype=torch.float64)
        return (self.params.delta / 255 * torch.sin(2 * math.pi * j * self.params.frequency / width)).float()

    def apply(self, x, indices, train, strength=1.0):
        return (x + strength * self.signal(x.shape[-1]).to(x)).clamp(0, 1)
