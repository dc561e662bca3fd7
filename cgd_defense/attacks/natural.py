"""The natural trigger of clean-image attacks: a colour statistic that some clean images already have.

Follows Rong et al., "Clean-image Backdoor Attacks" (arXiv:2403.15010, 2024): the attacker picks a
trigger feature that splits the training images into those with it and those without, flips the
labels of (some of) the former to the target class and changes no pixel; at inference the backdoor
fires on images that naturally carry the feature or are slightly modified to carry it.

Here the feature is concrete and computed from pixels: the image mean of one colour projection,
e.g. warmth = mean(R) - mean(B) in [0, 1] units (a warm, sunset/sepia cast). An image carries the
feature when its value is >= `threshold`. With `poisoning.select: natural-feature` only carriers are
eligible, strongest first. Training images are never changed (`apply` with train=True is the identity);
at test time each image is shifted along the colour direction until its value reaches
`threshold + strength * margin` (a global colour cast, the "slight modification" of the paper).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..config import StrictModel
from .triggers import TriggerKind, register_trigger

# colour directions (R, G, B); the statistic is the image mean of <direction, pixel>
FEATURE_DIRECTIONS = {
    "warmth": (1.0, 0.0, -1.0),
    "greenness": (-0.5, 1.0, -0.5),
    "brightness": (1 / 3, 1 / 3, 1 / 3),
}


@register_trigger("natural")
class NaturalFeature(TriggerKind):
    """A natural colour feature (clean-image attacks): identity on training images, a colour shift
    that gives the feature to test images."""

    class Params(StrictModel):
        feature: Literal["warmth", "greenness", "brightness"] = "warmth"
        threshold: float = Field(0.3, gt=-1, lt=1, description="an image carries the feature when its value >= threshold")
        margin: float = Field(0.05, ge=0, lt=1, description="test time: raise the value to threshold + strength * margin")

    def _direction(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(FEATURE_DIRECTIONS[self.params.feature], dtype=x.dtype, device=x.device)

    def feature_value(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) the feature of images x in [0, 1]."""
        return torch.einsum("bchw,c->b", x, self._direction(x)) / (x.shape[-1] * x.shape[-2])

    def carries(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_value(x) >= self.params.threshold

    def apply(self, x, indices, train, strength=1.0):
        if train:
            return x
        level = self.params.threshold + strength * self.params.margin
        d = self._direction(x).view(1, 3, 1, 1)
        step = d / (d * d).sum()  # adding c * step to every pixel raises the value by c (before clipping)
        x = x.clone()
        # clipping at 0/1 eats part of each shift, so repeat on the images still short of the level
        for _ in range(20):
            deficit = (level - self.feature_value(x)).clamp(min=0)
            if float(deficit.max()) < 1e-4:
                break
            x = (x + deficit.view(-1, 1, 1, 1) * step).clamp(0, 1)
        return x
