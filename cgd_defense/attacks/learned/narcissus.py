"""Narcissus (Zeng, Pan, Just, Lyu, Qiu & Jia, "Narcissus: A Practical Clean-Label Backdoor Attack
with Limited Information", ACM CCS 2023): a clean-label attack that needs only target-class images.

The authors' recipe (github.com/reds-lab/Narcissus, `narcissus_function.py`):
1. a surrogate is trained on public out-of-distribution (POOD) data plus the target-class images
   (Tiny-ImageNet + CIFAR-10's target class for CIFAR-10; ResNet-18, 200 epochs, SGD 0.1, cosine);
2. poi-warm-up: it is fine-tuned on the target-class images alone (5 epochs, RAdam, lr 0.1);
3. trigger generation: a universal perturbation in the L_inf ball of 16/255 minimising the surrogate's
   cross-entropy of the target class on augmented target-class images (RAdam lr 0.01 on the [-1, 1]
   scale, i.e. 0.005 on [0, 1], 1000 passes, batch 350);
4. a tiny share of the training set, all target-class images, get the trigger added (0.05% of
   CIFAR-10's training set, 25 images); labels are untouched;
5. at test time the trigger is magnified three times (`test.strength: 3`).

POOD data here: the harness's public split (a stratified 20% of the training set that the victim
never trains on), without its target-class images, so the only target-class data the attacker uses
are its own target-class training images. Without a public split (a run with `public_holdout: false`,
or a FitContext without `public`) a seeded `pood_fraction` slice of the non-target training images is
used instead; the victim does train on that slice, so prefer the public split.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from ...data.datasets import ImageData
from ...data.splits import stratified_holdout
from ...errors import CGDError
from ...harness.augment import random_crop_flip
from ...harness.precision import autocast, resolve_device, use_bf16
from ...harness.trainer import train
from ..triggers import register_trigger
from .fit import LearnedParams, LearnedTrigger, SurrogateRecipe, progress, train_surrogate


# A trigger that ends below this share of its L_inf budget never left its zero start: the fit failed.
STALLED_FRACTION = 0.01


@register_trigger("narcissus")
class NarcissusTrigger(LearnedTrigger):
    """An additive trigger in the L_inf ball of eps, pointing inwards to the target class.
    `test.strength` magnifies it at test time (the paper's x3); the result is clipped to [0, 1]."""

    fit_version: ClassVar[int] = 2  # 2: a stalled fit is an error; version 1 cached a zero trigger

    class Params(LearnedParams):
        eps: float = Field(16, gt=0, le=128, description="L_inf radius of the trigger on the 0-255 scale")
        warmup_epochs: float = Field(5, ge=0, description="poi-warm-up epochs on the target-class images")
        warmup_lr: float = Field(0.1, gt=0, description="poi-warm-up RAdam learning rate")
        passes: int = Field(1000, ge=1, le=100_000, description="trigger-generation passes over the target-class images")
        lr: float = Field(0.005, gt=0, le=1, description="trigger RAdam learning rate on the [0, 1] pixel scale")
        batch_size: int = Field(350, ge=1)
        max_target_images: int | None = Field(None, ge=1, description="fit on at most this many target-class images")
        pood_fraction: float = Field(0.2, gt=0, lt=1, description="without a public split: the share of the "
                                                                  "non-target training images used as POOD data")
        surrogate: SurrogateRecipe = Field(default_factory=lambda: SurrogateRecipe(epochs=200, lr=0.1))

    def fit_inputs(self, context, policy):
        return {**super().fit_inputs(context, policy), "public": context.public_digest}

    def surrogate_data(self, context, policy, seed: int) -> ImageData:
        """POOD images (all classes but the target) plus the attacker's target-class images."""
        if context.public is not None and len(context.public):
            pood = context.public.subset(torch.nonzero(context.public.labels != policy.target).flatten())
        else:
            others = context.train.subset(torch.nonzero(context.train.labels != policy.target).flatten())
            _, held = stratified_holdout(others.labels, self.scaled.pood_fraction, seed)
            pood = others.subset(held)
        own = context.train.subset(torch.nonzero(context.train.labels == policy.target).flatten())
        return ImageData(torch.cat([pood.images, own.images]), torch.cat([pood.labels, own.labels]), own.classes)

    def compute_fit(self, context, policy, params):
        device = resolve_device(context.device)
        bf16 = use_bf16(context.preset.train.precision, device)
        model = train_surrogate(context, self.surrogate_recipe(context), self.surrogate_data(context, policy, params.seed),
                                params.seed, desc="narcissus: POOD surrogate")
        target_idx = torch.nonzero(context.train.labels == policy.target).flatten()
        if params.max_target_images is not None:
            g = torch.Generator().manual_seed(params.seed)
            target_idx = target_idx[torch.randperm(len(target_idx), generator=g)[:params.max_target_images]]
        if len(target_idx) == 0:
            raise ValueError(f"narcissus: no training image of the target class {policy.target}")
        images = context.train.images[target_idx]
        labels = torch.full((len(images),), policy.target, dtype=torch.long)
        if params.warmup_epochs > 0:
            cfg = context.preset.train.model_copy(update={"epochs": params.warmup_epochs, "schedule": "constant",
                                                          "lr": params.warmup_lr, "label_smoothing": 0.0})
            model.train()
            train(model, images, labels, cfg, seed=params.seed, device=context.device, desc="narcissus: poi-warm-up",
                  optimizer=torch.optim.RAdam(model.parameters(), lr=params.warmup_lr))
        model.eval().requires_grad_(False)
        eps = params.eps / 255
        g = torch.Generator().manual_seed(params.seed + 1)
        trigger = torch.zeros(1, 3, self.image_size, self.image_size, device=device, requires_grad=True)
        opt = torch.optim.RAdam([trigger], lr=params.lr)
        target = torch.full((params.batch_size,), policy.target, dtype=torch.long, device=device)
        batches = math.ceil(len(images) / params.batch_size)
        crop = context.preset.train.crop_padding
        with progress(params.passes * batches, "narcissus: trigger") as bar:
            for _ in range(params.passes):
                order = torch.randperm(len(images), generator=g)
                for b in range(batches):
                    idx = order[b * params.batch_size:(b + 1) * params.batch_size]
                    x = random_crop_flip(images[idx].float().div(255), crop, True, g).to(device)
                    with autocast(bf16, device):
                        logits = model((x + trigger.clamp(-eps, eps)).clamp(0, 1))
                    loss = F.cross_entropy(logits.float(), target[:len(idx)])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        result, final_loss = trigger.detach().clamp(-eps, eps)[0].cpu(), float(loss.detach())
        if (l_inf := float(result.abs().max())) < STALLED_FRACTION * eps:
            raise CGDError(
                f"narcissus: trigger generation stalled (trigger L_inf {l_inf:.2e}, final loss {final_loss:.2e}): "
                f"after the poi-warm-up the surrogate gives the target class a loss that is zero in floating point, "
                f"so the trigger's gradient vanished. Lower trigger.warmup_lr or trigger.warmup_epochs for this preset.")
        return {"trigger": result, "final_loss": final_loss}

    def load_fit(self, state, context, policy):
        self.trigger = state["trigger"]

    def apply(self, x, indices, train, strength=1.0):
        self.require_fitted()
        return (x + strength * self.trigger.to(x)).clamp(0, 1)
