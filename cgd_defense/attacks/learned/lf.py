"""Low-frequency trigger (Zeng, Park, Mao & Jia, "Rethinking the Backdoor Attacks' Triggers: A
Frequency Perspective", ICCV 2021): a universal additive perturbation that pushes images towards the
target class on a surrogate model, constrained to low spatial frequencies so it is smooth and survives
low-pass filtering; then dirty-label poisoning with it.

BackdoorBench's recipe (`resource/lowFrequency/generate_pattern.py`, `universal_pert.py`,
`gauss_smooth.py`): 100 random training images, up to 50 passes of a targeted universal perturbation
against a clean PreActResNet-18; after every update the perturbation is low-passed with a Gaussian of
sigma 6 pixels (30 taps) and rescaled to span [0, 0.2], so the stored CIFAR-10 pattern is non-negative
with a peak of 51/255. Here each update is a step along the low-passed gradient of the target-class
cross-entropy over a mini-batch (the same objective as their per-image targeted DeepFool steps), then
the same smoothing and rescaling; the result is added to the image and clipped.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from ...harness.precision import autocast, resolve_device, use_bf16
from ..triggers import register_trigger
from .fit import LearnedParams, LearnedTrigger, SurrogateRecipe, progress, train_surrogate


def gaussian_lowpass(v: torch.Tensor, sigma: float, taps: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), zero-padded like BackdoorBench's `gauss_smooth`: besides
    removing high frequencies it fades the pattern towards the image border."""
    t = torch.arange(taps, dtype=torch.float32, device=v.device) - (taps - 1) / 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(v.dtype)
    c = v.shape[1]
    lo, hi = (taps - 1) // 2, taps // 2
    v = F.conv2d(F.pad(v, (lo, hi, 0, 0)), k.view(1, 1, 1, -1).expand(c, 1, 1, taps), groups=c)
    return F.conv2d(F.pad(v, (0, 0, lo, hi)), k.view(1, 1, -1, 1).expand(c, 1, taps, 1), groups=c)


def rescale_to_range(v: torch.Tensor, peak: float) -> torch.Tensor:
    """Shift and scale so the perturbation spans exactly [0, peak] (BackdoorBench's normalisation)."""
    span = v.max() - v.min()
    if float(span) == 0:
        return torch.zeros_like(v)
    return (v - v.min()) / span * peak


@register_trigger("low-frequency")
class LowFrequencyTrigger(LearnedTrigger):
    """A smooth universal perturbation, added to the image. `test.strength` scales it."""

    class Params(LearnedParams):
        eps: float = Field(51, gt=0, le=255, description="peak of the perturbation on the 0-255 scale; it spans [0, eps]")
        sigma: float = Field(6.0, gt=0, le=64, description="low-pass Gaussian's sigma in pixels")
        taps: int = Field(30, ge=1, le=255, description="low-pass kernel length")
        images: int = Field(100, ge=1, description="training images the perturbation is fitted on")
        passes: int = Field(50, ge=1, le=10_000, description="passes over those images")
        batch_size: int = Field(10, ge=1)
        step: float = Field(0.1, gt=0, le=1, description="step along the normalised smoothed gradient, "
                                                        "relative to the peak, before rescaling")
        surrogate: SurrogateRecipe = Field(default_factory=SurrogateRecipe)

    def compute_fit(self, context, policy, params):
        device = resolve_device(context.device)
        model = train_surrogate(context, self.surrogate_recipe(context), context.train, params.seed,
                                desc="low-frequency: clean model")
        bf16 = use_bf16(context.preset.train.precision, device)
        g = torch.Generator().manual_seed(params.seed)
        chosen = torch.randperm(len(context.train), generator=g)[:params.images]
        images = context.train.images[chosen].float().div(255).to(device)
        target = torch.full((len(images),), policy.target, dtype=torch.long, device=device)
        peak = params.eps / 255
        v = torch.zeros(1, 3, self.image_size, self.image_size, device=device)
        batches = math.ceil(len(images) / params.batch_size)
        with progress(params.passes * batches, "low-frequency: trigger") as bar:
            for _ in range(params.passes):
                order = torch.randperm(len(images), generator=g)
                for b in range(batches):
                    idx = order[b * params.batch_size:(b + 1) * params.batch_size]
                    v.requires_grad_(True)
                    with autocast(bf16, device):
                        logits = model((images[idx] + v).clamp(0, 1))
                    loss = F.cross_entropy(logits.float(), target[idx])
                    grad, = torch.autograd.grad(loss, v)
                    smooth = gaussian_lowpass(grad, params.sigma, params.taps)
                    v = v.detach() - params.step * peak * smooth / smooth.abs().max().clamp_min(1e-12)
                    v = rescale_to_range(gaussian_lowpass(v, params.sigma, params.taps), peak)
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            with torch.no_grad(), autocast(bf16, device):
                hit = (model((images + v).clamp(0, 1)).argmax(1) == policy.target).float().mean()
        return {"perturbation": v[0].cpu(), "fit_target_rate": float(hit)}

    def load_fit(self, state, context, policy):
        self.perturbation = state["perturbation"]

    def apply(self, x, indices, train, strength=1.0):
        self.require_fitted()
        return (x + strength * self.perturbation.to(x)).clamp(0, 1)
