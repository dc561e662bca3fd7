"""What every learned trigger kind shares: preset-scaled parameters, a cached `fit`, surrogate models,
PGD, and progress bars.

A learned kind (`LearnedTrigger`) is a registered trigger kind whose trigger comes out of an
optimisation: a generator, an encoder, a patch or a perturbation fitted against a surrogate model.
The poisoner calls `fit(context, policy)` once per component before `apply` (see
`cgd_defense/attacks/poison.py: FitContext, build_components`). The fit's output is stored with
`Cache.get_or_compute` under a content hash of everything that determines it: the images and labels it
fits on, the kind's parameters as scaled for the preset, the surrogate's resolved recipe, the attack's
target, and the seed. A second fit with the same inputs reads the stored output.

Parameters are the papers' settings; `presets: {smoke: {...}, quick: {...}}` in the attack YAML changes
sizes and schedules for a preset (fewer steps, fewer images, a smaller surrogate), never the method,
the way registry.yaml scales defenses. A preset without an entry uses the papers' settings.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from tqdm.auto import tqdm

from ...config import StrictModel
from ...data.datasets import ImageData
from ...data.splits import stratified_holdout
from ...harness.cache import tensor_digest
from ...harness.precision import autocast, resolve_device, use_bf16
from ...harness.trainer import Batch, TrainConfig, progress_enabled, train
from ...models import Classifier, create_model
from ..triggers import TriggerKind

if TYPE_CHECKING:
    from ...harness.presets import Preset
    from ..poison import FitContext
    from ..spec import PoisoningPolicy

FIT_CACHE_KIND = "attack-fit"
SURROGATE_CACHE_KIND = "attack-surrogate"


def progress(total: int, desc: str) -> tqdm:
    """The progress bar of a fit loop (off with CGD_PROGRESS=0, like the trainer's)."""
    return tqdm(total=total, desc=desc, disable=not progress_enabled(), leave=False, dynamic_ncols=True,
                mininterval=1.0)


def _deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class LearnedParams(StrictModel):
    """Fields every learned kind has. Subclasses add the kind's hyperparameters (the papers' values
    as defaults)."""

    seed: int = Field(0, description="seeds the fit: initialisation, data order, image draws")
    presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-preset changes of sizes and schedules, e.g. "
                                          "{smoke: {steps: 5, surrogate: {epochs: 1}}}; other presets use these values")

    @model_validator(mode="after")
    def _check_presets(self):
        if not self.presets:
            return self
        from ...harness.presets import load_presets  # deferred: reads presets.yaml

        known = load_presets()
        for name, overlay in self.presets.items():
            if name not in known:
                raise ValueError(f"presets: unknown preset '{name}'; presets: {', '.join(known)}")
            if "presets" in overlay:
                raise ValueError(f"presets.{name}: a preset entry cannot hold 'presets'")
            try:
                self.for_preset(name)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"presets.{name}: {problems}") from None
        return self

    def for_preset(self, name: str):
        """These parameters with the preset's changes applied (and no `presets` table)."""
        base = self.model_dump(exclude={"presets"})
        return type(self).model_validate(_deep_merge(base, self.presets.get(name, {})))


class SurrogateRecipe(StrictModel):
    """How a surrogate model is trained. Unset fields follow the preset's victim recipe, so the
    surrogate shrinks and grows with the preset (`paper`: PreActResNet-18 with BackdoorBench's 100-epoch
    recipe, the 'clean model' BackdoorBench's LF and TrojanNN resources were made with)."""

    model: str | None = Field(None, description="architecture; default: the preset's victim model")
    epochs: float | None = Field(None, gt=0, description="default: the preset's epochs")
    lr: float | None = Field(None, gt=0, description="default: the preset's learning rate")
    max_images: int | None = Field(None, ge=1, description="train on at most this many images (stratified, seeded)")
    adversarial_eps: float = Field(0, ge=0, le=64, description="PGD adversarial training radius on the 0-255 "
                                                               "scale (Madry et al. 2018); 0: standard training")
    adversarial_steps: int = Field(7, ge=1, le=100, description="PGD steps per batch of adversarial training")

    def resolve(self, preset: "Preset") -> dict:
        """The recipe with the preset's defaults filled in (what the surrogate's cache key holds)."""
        overrides = {k: v for k, v in (("epochs", self.epochs), ("lr", self.lr)) if v is not None}
        return {"model": self.model or preset.model,
                "train": preset.train.model_copy(update=overrides).model_dump(mode="json"),
                "max_images": self.max_images, "adversarial_eps": self.adversarial_eps,
                "adversarial_steps": self.adversarial_steps}


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (the surrogate's normalisation),
    accumulated in float64 chunk by chunk."""
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255).transpose(0, 1).reshape(3, -1)
        total += x.sum(1)
        squares += (x * x).sum(1)
    count = images.numel() / 3
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-6).sqrt()
    return mean.tolist(), std.tolist()


def make_classifier(arch: str, num_classes: int, mean, std) -> Classifier:
    return Classifier(create_model(arch, num_classes), mean, std, arch=arch)


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int, *,
        targeted: bool = False, start: torch.Tensor | None = None, bf16: bool = False) -> torch.Tensor:
    """L_inf projected gradient descent (Madry et al., ICLR 2018) on images x in [0, 1]: raise the loss
    of labels y (untargeted) or lower it (targeted), staying within eps of x. `start` is an optional
    initial perturbation. The model's train/eval mode is left as it is."""
    x = x.detach()
    delta = torch.zeros_like(x) if start is None else start.detach().clone()
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            with autocast(bf16, x.device):
                logits = model((x + delta).clamp(0, 1))
            loss = F.cross_entropy(logits.float(), y)
            grad, = torch.autograd.grad(loss, delta)
            direction = -grad.sign() if targeted else grad.sign()
            delta = (delta.detach() + step * direction).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def adversarial_loss(model: Classifier, eps: float, steps: int, label_smoothing: float, bf16: bool,
                     seed: int) -> Callable[[torch.Tensor, Batch], torch.Tensor]:
    """The trainer's `loss_fn` for PGD adversarial training (Madry et al. 2018): cross-entropy on
    PGD examples (random start, step 2.5 eps / steps) instead of the clean batch."""
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        start = (torch.rand(batch.x.shape, generator=gen) * 2 - 1).to(batch.x) * eps
        x_adv = pgd(model, batch.x, batch.y, eps, 2.5 * eps / steps, steps, start=start, bf16=bf16)
        with autocast(bf16, batch.x.device):
            adv_logits = model(x_adv)
        return F.cross_entropy(adv_logits.float(), batch.y, label_smoothing=label_smoothing)

    return loss_fn


def train_surrogate(context: "FitContext", recipe: dict, data: ImageData, seed: int, desc: str) -> Classifier:
    """A surrogate classifier trained with `recipe` (`SurrogateRecipe.resolve`) on `data`, cached: kinds
    that ask for the same recipe on the same data share one model."""
    if recipe["max_images"] is not None and recipe["max_images"] < len(data):
        keep, _ = stratified_holdout(data.labels, 1 - recipe["max_images"] / len(data), seed)
        data = data.subset(keep)
    spec = {"images": tensor_digest(data.images), "labels": tensor_digest(data.labels),
            "num_classes": data.num_classes, "recipe": recipe, "seed": seed}
    mean, std = channel_stats(data.images)

    def compute():
        torch.manual_seed(seed)
        model = make_classifier(recipe["model"], data.num_classes, mean, std)
        cfg = TrainConfig.model_validate(recipe["train"])
        loss_fn = None
        if recipe["adversarial_eps"] > 0:
            bf16 = use_bf16(cfg.precision, resolve_device(context.device))
            loss_fn = adversarial_loss(model, recipe["adversarial_eps"] / 255, recipe["adversarial_steps"],
                                       cfg.label_smoothing, bf16, seed)
        train(model, data.images, data.labels, cfg, seed=seed, device=context.device, desc=desc, loss_fn=loss_fn)
        return {"state_dict": {k: v.cpu() for k, v in model.net.state_dict().items()}}

    payload = context.get_or_compute(SURROGATE_CACHE_KIND, spec, compute)
    model = make_classifier(recipe["model"], data.num_classes, mean, std)
    model.net.load_state_dict(payload["state_dict"])
    return model.to(resolve_device(context.device)).eval()


class LearnedTrigger(TriggerKind):
    """A trigger kind with a `fit(context, policy)` step before `apply`.

    Subclasses define `compute_fit(context, policy, params) -> dict` (tensors and plain data, the
    stored output), `fit_inputs(context, policy) -> dict` (what else besides the parameters the output
    depends on; by default the training images and labels and the attack's target) and
    `load_fit(state, context, policy)` (set up `apply` from the output). `self.scaled` holds the
    parameters as scaled for the context's preset."""

    fit_version: ClassVar[int] = 1  # a kind bumps it when its fit changes what it computes

    def fit_inputs(self, context: "FitContext", policy: "PoisoningPolicy") -> dict:
        return {"train": context.train_digest, "target": policy.target}

    def compute_fit(self, context: "FitContext", policy: "PoisoningPolicy", params) -> dict:
        raise NotImplementedError

    def load_fit(self, state: dict, context: "FitContext", policy: "PoisoningPolicy") -> None:
        raise NotImplementedError

    def surrogate_recipe(self, context: "FitContext") -> dict | None:
        surrogate = getattr(self.scaled, "surrogate", None)
        return surrogate.resolve(context.preset) if surrogate is not None else None

    def fit(self, context: "FitContext", policy: "PoisoningPolicy") -> None:
        self.scaled = self.params.for_preset(context.preset.name)
        spec = {"kind": self.kind, "version": self.fit_version,
                "params": self.scaled.model_dump(mode="json", exclude={"presets"}),
                "surrogate": self.surrogate_recipe(context), "image_size": self.image_size,
                **self.fit_inputs(context, policy)}
        self.fit_key = context.cache.key(FIT_CACHE_KIND, spec)
        state = context.get_or_compute(FIT_CACHE_KIND, spec, lambda: self.compute_fit(context, policy, self.scaled))
        self.load_fit(state, context, policy)

    def fitted(self) -> bool:
        return hasattr(self, "fit_key")

    def require_fitted(self) -> None:
        if not self.fitted():
            raise RuntimeError(f"trigger kind '{self.kind}' is learned: call fit(context, policy) before apply "
                               "(the poisoner does this when given a FitContext)")
