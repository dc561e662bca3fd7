"""Label-consistent backdoor (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks",
arXiv:1912.02771, 2019).

Clean-label: target-class training images are first made hard to classify by an untargeted L_inf PGD
perturbation against a surrogate model, so the victim cannot fit them from their content alone and
leans on the trigger; then a 3x3 pattern is stamped in all four corners. Labels stay correct. At test
time only the corner pattern is added (BackdoorBench `utils/bd_img_transform/lc.py`, test transform).

- PGD: eps 16/255 (BackdoorBench's CIFAR-10 replacement images, `..._16_train.npy`), step 1.5/255,
  100 steps (BackdoorBench `resource/label-consistent/craft_adv_dataset.py`), no random start.
- Surrogate: the paper and BackdoorBench attack an adversarially trained model (Madry et al. 2018,
  eps 8/255, 7 steps); `surrogate.adversarial_eps: 0` trains a standard one (the CPU presets).
- Corner pattern ("all-corners", amplitude 1): the authors' 3x3 sign pattern in each corner (below); a
  pixel moves by amplitude x 255 up (+1) or down (-1) in every channel, then is clipped, so at
  amplitude 1 it becomes white or black.

The fit trains (or reads) the surrogate; the PGD runs when the poisoner applies the trigger to the
chosen target-class images, and the perturbed images are stored as part of the poisoned training set.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...errors import ConfigError
from ...harness.precision import resolve_device, use_bf16
from ..triggers import register_trigger
from .fit import LearnedParams, LearnedTrigger, SurrogateRecipe, pgd, progress, train_surrogate

# The left corners' signs (row, column) in the authors' "all-corners" trigger; the right corners
# carry it mirrored left to right, and the bottom corners repeat the top ones (their coordinate lists in
# BackdoorBench `utils/bd_img_transform/lc.py`, from MadryLab/label-consistent-backdoor-code).
CORNER_SIGNS = torch.tensor([[1, -1, -1],
                             [-1, 1, -1],
                             [1, -1, 1]], dtype=torch.float32)


def corner_pattern(image_size: int, which: str) -> torch.Tensor:
    """(H, W) signs in {-1, 0, +1}: the 3x3 pattern in the four corners (all-corners) or in the
    bottom-right one only."""
    out = torch.zeros(image_size, image_size)
    s = CORNER_SIGNS
    if which == "all-corners":
        out[:3, :3] = s
        out[:3, -3:] = s.flip(1)
        out[-3:, :3] = s
    out[-3:, -3:] = s.flip(1)
    return out


@register_trigger("label-consistent")
class LabelConsistentTrigger(LearnedTrigger):
    """PGD-hardened target-class images plus a corner pattern (clean-label). `test.strength` scales
    the corner amplitude."""

    class Params(LearnedParams):
        eps: float = Field(16, gt=0, le=64, description="PGD radius on the 0-255 scale")
        step: float = Field(1.5, gt=0, le=64, description="PGD step on the 0-255 scale")
        steps: int = Field(100, ge=0, le=1000, description="PGD steps (0: no adversarial perturbation)")
        trigger: Literal["all-corners", "bottom-right"] = "all-corners"
        amplitude: float = Field(1.0, gt=0, le=1, description="corner pattern amplitude (BackdoorBench reduced_amplitude)")
        batch_size: int = Field(256, ge=1)
        surrogate: SurrogateRecipe = Field(default_factory=lambda: SurrogateRecipe(adversarial_eps=8))

    def __init__(self, params, image_size, attack_seed=0):
        super().__init__(params, image_size, attack_seed)
        if image_size < 6:
            raise ValueError(f"label-consistent: the corner pattern needs images of at least 6x6, got {image_size}")

    def compute_fit(self, context, policy, params):
        if not policy.clean_label:
            raise ConfigError("label-consistent perturbs target-class images and keeps their labels: the attack "
                              "needs 'poisoning.clean_label: true'")
        train_surrogate(context, self.surrogate_recipe(context), context.train, params.seed,
                        desc="label-consistent: surrogate")
        return {"target": policy.target}

    def load_fit(self, state, context, policy):
        self.target = int(state["target"])
        self.signs = corner_pattern(self.image_size, self.scaled.trigger)
        self.device = resolve_device(context.device)
        self.bf16 = use_bf16(context.preset.train.precision, self.device)
        self.surrogate = train_surrogate(context, self.surrogate_recipe(context), context.train, self.scaled.seed,
                                         desc="label-consistent: surrogate")

    def harden(self, x: torch.Tensor) -> torch.Tensor:
        """Untargeted PGD against the surrogate, labels = the target class (these are its images)."""
        p = self.scaled
        out = torch.empty_like(x)
        y = torch.full((len(x),), self.target, dtype=torch.long)
        with progress(len(x), "label-consistent: PGD") as bar:
            for start in range(0, len(x), p.batch_size):
                xb = x[start:start + p.batch_size].to(self.device)
                out[start:start + len(xb)] = pgd(self.surrogate, xb, y[:len(xb)].to(self.device), p.eps / 255,
                                                 p.step / 255, p.steps, bf16=self.bf16).to(x)
                bar.update(len(xb))
        return out

    def apply(self, x, indices, train, strength=1.0):
        self.require_fitted()
        if train and self.scaled.steps > 0:
            x = self.harden(x)
        shift = (self.scaled.amplitude * strength) * self.signs.to(x)
        return (x + shift).clamp(0, 1)
