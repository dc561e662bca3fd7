"""Apply an attack to a dataset: the poisoned training set and the triggered test set.

`PoisonedData` keeps the ground truth (which samples were poisoned, their original labels) beside
the images and labels the defender sees; `defender_view()` strips it, so a defense cannot read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch

from ..data.datasets import ImageData
from ..errors import CGDError
from ..harness.cache import Cache, tensor_digest
from ..harness.presets import Preset
from .spec import AttackSpec
from .triggers import TriggerKind


@dataclass
class PoisonedData:
    images: torch.Tensor          # uint8 (N, 3, H, W), what the victim trains on
    labels: torch.Tensor          # labels the victim trains on
    original_labels: torch.Tensor  # true labels
    poison_mask: torch.Tensor     # bool: carries the trigger and the attack's label (the backdoor)
    cross_mask: torch.Tensor      # bool: trigger-noise samples kept at their true label (WaNet cross)
    classes: list[str]
    attack: str
    target: int

    def __len__(self):
        return len(self.labels)

    @property
    def poison_indices(self) -> torch.Tensor:
        return torch.nonzero(self.poison_mask).flatten()

    @property
    def modified_mask(self) -> torch.Tensor:
        return self.poison_mask | self.cross_mask

    def defender_view(self) -> ImageData:
        """What a defense may see: images and given labels only."""
        return ImageData(self.images, self.labels, self.classes)

    def subset(self, indices) -> "PoisonedData":
        i = torch.as_tensor(indices, dtype=torch.long)
        return PoisonedData(self.images[i], self.labels[i], self.original_labels[i], self.poison_mask[i],
                            self.cross_mask[i], self.classes, self.attack, self.target)

    def to_payload(self) -> dict:
        return {"images": self.images, "labels": self.labels, "original_labels": self.original_labels,
                "poison_mask": self.poison_mask, "cross_mask": self.cross_mask, "classes": self.classes,
                "attack": self.attack, "target": self.target}

    @classmethod
    def from_payload(cls, p: dict) -> "PoisonedData":
        return cls(p["images"], p["labels"], p["original_labels"], p["poison_mask"], p["cross_mask"],
                   list(p["classes"]), p["attack"], int(p["target"]))

    def __repr__(self) -> str:
        return (f"PoisonedData(attack={self.attack!r}, n={len(self)}, poisoned={int(self.poison_mask.sum())}, "
                f"cross={int(self.cross_mask.sum())}, target={self.target})")


def target_labels(spec: AttackSpec, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label an attack assigns to a triggered sample of true label `labels`."""
    p = spec.poisoning
    if p.label_mode == "all-to-all":
        return (labels + p.label_shift) % num_classes
    if p.label_mode == "keep":
        return labels.clone() if not p.clean_label else torch.full_like(labels, p.target)
    return torch.full_like(labels, p.target)


@dataclass
class FitContext:
    """What a learned trigger kind (cgd_defense/attacks/learned/) fits on before it is applied: the
    clean data the attacker poisons (`train`), data the victim never trains on (`public`: the harness's
    public split, or None), the cache that stores fit outputs, and the preset that sizes the fit."""

    train: ImageData
    cache: Cache
    preset: Preset
    public: ImageData | None = None
    device: str | None = None
    loaded: dict[str, Any] = field(default_factory=dict, repr=False)  # fit outputs read in this process

    @cached_property
    def train_digest(self) -> str:
        return tensor_digest(self.train.images) + tensor_digest(self.train.labels)

    @cached_property
    def public_digest(self) -> str | None:
        return None if self.public is None else tensor_digest(self.public.images) + tensor_digest(self.public.labels)

    def get_or_compute(self, kind: str, spec: Any, compute: Callable[[], Any]) -> Any:
        """`Cache.get_or_compute`, remembering what was read so later components reuse it."""
        key = self.cache.key(kind, spec)
        if key not in self.loaded:
            self.loaded[key] = self.cache.get_or_compute(kind, spec, compute)
        return self.loaded[key]


def build_components(spec: AttackSpec, image_size: int, train: bool, fit: FitContext | None = None) -> list[TriggerKind]:
    """The attack's trigger components, learned ones (kinds with a `fit(context, policy)` step) fitted
    on `fit` first; a fit done before comes from the cache."""
    components = spec.components(image_size, train=train)
    for comp in components:
        if hasattr(comp, "fit"):
            if fit is None:
                raise CGDError(f"attack '{spec.name}': trigger kind '{comp.kind}' is learned and must be fitted "
                               "before use: pass a FitContext (clean training data, cache, preset)")
            comp.fit(fit, spec.poisoning)
    return components


def fit_keys(spec: AttackSpec, image_size: int, fit: FitContext | None) -> list[str]:
    """Cache keys of the fitted outputs of the attack's learned components (empty when it has none):
    whatever is made with them must carry them in its own cache key."""
    if fit is None:
        return []
    return [comp.fit_key for comp in build_components(spec, image_size, True, fit) if hasattr(comp, "fit")]


def apply_components(components: list[TriggerKind], images_u8: torch.Tensor, indices: torch.Tensor,
                     train: bool, strength: float = 1.0, batch_size: int = 2048) -> torch.Tensor:
    """Apply trigger components in order to uint8 images; the result is quantised back to uint8,
    as a poisoned image saved to disk would be."""
    out = torch.empty_like(images_u8)
    for start in range(0, len(images_u8), batch_size):
        x = images_u8[start:start + batch_size].float() / 255
        idx = indices[start:start + batch_size]
        for comp in components:
            x = comp.apply(x, idx, train=train, strength=strength)
        out[start:start + batch_size] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def natural_feature_margin(components: list[TriggerKind], images_u8: torch.Tensor,
                           batch_size: int = 4096) -> torch.Tensor:
    """(N,) how far each image's natural feature lies above its threshold (min over the components
    that define one); >= 0 means the image already carries the natural trigger."""
    natural = [c for c in components if hasattr(c, "feature_value")]
    out = torch.empty(len(images_u8))
    for start in range(0, len(images_u8), batch_size):
        x = images_u8[start:start + batch_size].float() / 255
        out[start:start + batch_size] = torch.stack(
            [c.feature_value(x) - c.params.threshold for c in natural]).min(0).values
    return out


TARGET_POOL_SEED_OFFSET = 7919  # any fixed offset; see selection_seed


def selection_seed(policy) -> int:
    """Seed of the poison (and cross) draw. A target-only pool is exactly the class list that the
    harness's stratified validation split permutes with the run seed (`data.splits.stratified_holdout`,
    its first draw when the target is class 0): with the same seed the two permutations coincided, and a
    small clean-label budget (Narcissus, 20 images) landed entirely in the validation split. Target-only
    pools therefore draw from a stream of their own."""
    return policy.seed + (TARGET_POOL_SEED_OFFSET if policy.eligible_set == "target" else 0)


def choose_poison_indices(spec: AttackSpec, labels: torch.Tensor, num_classes: int,
                          images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded choice of (poison, cross) indices following the policy; counts are exact:
    round(ratio * N) poisons (capped by the eligible pool), round(cross_ratio * poisons) cross samples.
    With `select: natural-feature` the pool is the eligible images that carry the natural feature
    (`images`, uint8, are needed), taken strongest first."""
    p = spec.poisoning
    n = len(labels)
    g = torch.Generator().manual_seed(selection_seed(p))
    eligible = {"non-target": labels != p.target, "target": labels == p.target,
                "all": torch.ones(n, dtype=torch.bool)}[p.eligible_set]
    n_wanted = int(round(p.ratio * n))
    if p.select == "natural-feature":
        if images is None:
            raise ValueError("select: natural-feature needs the images to find the natural trigger's carriers")
        margin = natural_feature_margin(spec.components(images.shape[-1], train=True), images)
        pool = torch.nonzero(eligible & (margin >= 0)).flatten()
        order = torch.sort(margin[pool], descending=True, stable=True).indices
        poison = pool[order[:n_wanted]]
    else:
        pool = torch.nonzero(eligible).flatten()
        poison = pool[torch.randperm(len(pool), generator=g)[:n_wanted]]
    n_poison = len(poison)
    rest = torch.ones(n, dtype=torch.bool)
    rest[poison] = False
    rest_idx = torch.nonzero(rest).flatten()
    n_cross = min(int(round(p.cross_ratio * n_poison)), len(rest_idx))
    cross = rest_idx[torch.randperm(len(rest_idx), generator=g)[:n_cross]]
    return torch.sort(poison).values, torch.sort(cross).values


def poison_training_set(spec: AttackSpec, clean: ImageData, fit: FitContext | None = None) -> PoisonedData:
    n, c = len(clean), clean.num_classes
    size = clean.images.shape[-1]
    poison_idx, cross_idx = choose_poison_indices(spec, clean.labels, c, clean.images)
    images = clean.images.clone()
    labels = clean.labels.clone()
    components = build_components(spec, size, True, fit)
    if len(poison_idx):
        images[poison_idx] = apply_components(components, clean.images[poison_idx], poison_idx, train=True)
        labels[poison_idx] = target_labels(spec, clean.labels[poison_idx], c)
    if len(cross_idx):
        cross_components = [comp.cross_variant() if hasattr(comp, "cross_variant") else comp for comp in components]
        images[cross_idx] = apply_components(cross_components, clean.images[cross_idx], cross_idx, train=True)
    poison_mask = torch.zeros(n, dtype=torch.bool)
    poison_mask[poison_idx] = True
    if spec.poisoning.clean_label:
        poison_mask &= labels == spec.poisoning.target
    cross_mask = torch.zeros(n, dtype=torch.bool)
    cross_mask[cross_idx] = True
    return PoisonedData(images, labels, clean.labels.clone(), poison_mask, cross_mask, clean.classes,
                        spec.name, spec.poisoning.target)


@dataclass
class TriggeredTest:
    images: torch.Tensor         # triggered test images (uint8)
    true_labels: torch.Tensor
    attack_labels: torch.Tensor  # what the attacker wants them classified as
    indices: torch.Tensor        # their indices in the clean test set


def trigger_test_set(spec: AttackSpec, clean_test: ImageData, fit: FitContext | None = None) -> TriggeredTest:
    """Triggered copies of the test images whose true label differs from the attack's label
    (for all-to-one: every non-target image; for all-to-all: every image, by its label map)."""
    c = clean_test.num_classes
    wanted = target_labels(spec, clean_test.labels, c)
    if spec.poisoning.label_mode == "all-to-all":
        keep = wanted != clean_test.labels
    else:
        keep = clean_test.labels != spec.poisoning.target
        wanted = torch.full_like(clean_test.labels, spec.poisoning.target)
    idx = torch.nonzero(keep).flatten()
    components = build_components(spec, clean_test.images.shape[-1], False, fit)
    # test-time indices are offset so per-image randomness differs from the training images'
    images = apply_components(components, clean_test.images[idx], idx + 10_000_000, train=False,
                              strength=spec.test.strength)
    return TriggeredTest(images, clean_test.labels[idx], wanted[idx], idx)
