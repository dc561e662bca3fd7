"""TrojanNN (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018): a patch whose pixels are
optimised to drive selected internal neurons of a model to a high value, then ordinary dirty-label
poisoning with that patch.

As in BackdoorBench (`attack/trojannn.py`, `config/attack/trojannn/preactresnet18.yaml`):
- the model is a clean model of the victim's architecture trained on the clean training data (here the
  surrogate, trained on the attacker's pool with the preset's recipe);
- the neurons are the `num_neurons` (2) inputs of the final linear layer with the largest summed
  absolute weight ("most connected"); their target activation is 100;
- the trigger starts from the mask image (here a white square: BackdoorBench's `square.png` is a 10x10
  square 2 pixels from the bottom-right corner of a 32x32 image) and takes signed-gradient steps of
  0.1 for 1000 iterations on the squared distance of those activations to the target, kept within 0.3
  of the start and inside [0, 1], the model seeing the patch alone on a black image.
The patch is then stamped onto the poisoned images (the paper's trigger stamping; BackdoorBench adds
it, which saturates the same pixels).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...harness.precision import autocast, resolve_device, use_bf16
from ..triggers import register_trigger
from .fit import LearnedParams, LearnedTrigger, SurrogateRecipe, progress, train_surrogate


@register_trigger("trojannn")
class TrojanNNTrigger(LearnedTrigger):
    """A square patch optimised to excite selected neurons. `test.strength` < 1 blends it in."""

    class Params(LearnedParams):
        size: int = Field(10, ge=1, le=64, description="patch side in pixels")
        location: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
        margin: int = Field(2, ge=0, description="pixels between the patch and the image border")
        init: float = Field(1.0, ge=0, le=1, description="initial patch value (1: white, the mask image)")
        num_neurons: int = Field(2, ge=1, le=64, description="neurons of the penultimate layer to excite")
        target_value: float = Field(100.0, description="activation the selected neurons are driven to")
        eps: float = Field(0.3, gt=0, le=1, description="how far the patch may move from its initial value")
        step: float = Field(0.1, gt=0, le=1, description="signed-gradient step")
        iterations: int = Field(1000, ge=1, le=100_000)
        surrogate: SurrogateRecipe = Field(default_factory=SurrogateRecipe)

    def __init__(self, params, image_size, attack_seed=0):
        super().__init__(params, image_size, attack_seed)
        if params.size + params.margin > image_size:
            raise ValueError(f"trojannn: patch size {params.size} + margin {params.margin} exceeds image size {image_size}")

    def corner(self) -> tuple[int, int]:
        """(row, column) of the patch's top-left pixel (after fit: the preset-scaled parameters')."""
        p, n = getattr(self, "scaled", self.params), self.image_size
        far = n - p.size - p.margin
        return {"bottom-right": (far, far), "bottom-left": (far, p.margin), "top-right": (p.margin, far),
                "top-left": (p.margin, p.margin)}[p.location]

    def compute_fit(self, context, policy, params):
        device = resolve_device(context.device)
        model = train_surrogate(context, self.surrogate_recipe(context), context.train, params.seed,
                                desc="trojannn: clean model")
        neurons = model.classifier.weight.detach().abs().sum(0).argsort(descending=True)[:params.num_neurons]
        bf16 = use_bf16(context.preset.train.precision, device)
        (r, c), s, n = self.corner(), params.size, self.image_size
        mask = torch.zeros(1, 1, n, n, device=device)
        mask[..., r:r + s, c:c + s] = 1
        start = torch.full((1, 3, n, n), params.init, device=device) * mask
        canvas = start.clone()
        targets = torch.full((1, len(neurons)), params.target_value, device=device)
        with progress(params.iterations, "trojannn: patch") as bar:
            for _ in range(params.iterations):
                canvas.requires_grad_(True)
                with autocast(bf16, device):
                    features = model.forward_features(canvas * mask)
                cost = ((features.float()[:, neurons] - targets) ** 2).sum()
                grad, = torch.autograd.grad(cost, canvas)
                canvas = canvas.detach() - params.step * grad.sign()
                canvas = torch.minimum(torch.maximum(canvas, start - params.eps), start + params.eps).clamp(0, 1)
                bar.update(1)
                bar.set_postfix(cost=f"{float(cost.detach()):.3g}", refresh=False)
        return {"patch": canvas[0, :, r:r + s, c:c + s].cpu(), "neurons": neurons.cpu(), "final_cost": float(cost.detach())}

    def load_fit(self, state, context, policy):
        self.patch = state["patch"]

    def apply(self, x, indices, train, strength=1.0):
        self.require_fitted()
        (r, c), s = self.corner(), self.scaled.size
        x = x.clone()
        region = x[:, :, r:r + s, c:c + s]
        x[:, :, r:r + s, c:c + s] = region + min(1.0, strength) * (self.patch.to(x) - region)
        return x
