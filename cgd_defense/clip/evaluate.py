"""Zero-shot evaluation of a CLIP on a dataset's test set: accuracy, per-class accuracy, expected
calibration error, and for a backdoored CLIP its own zero-shot attack success rate.

Calibration uses the CLIP's own learned logit scale (softmax of logit_scale x cosine), the way CLIP
produces zero-shot probabilities; ECE is the usual 15-bin equal-width estimate (Guo et al., ICML 2017).
"""
from __future__ import annotations

import torch

from ..data.datasets import load_split
from ..harness.cache import Cache
from ..harness.metrics import accuracy, attack_success_rate
from .classnames import TemplateSet
from .factory import ClipModel
from .zeroshot import class_prompt_names, zero_shot_logits


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += float(in_bin.float().mean()) * abs(float(confidence[in_bin].mean()) - float(correct[in_bin].mean()))
    return ece


def evaluate_clip(clip: ClipModel, dataset: str, data_root, *, cache: Cache | None = None,
                  templates: TemplateSet = "reference", attack: str | None = None) -> dict:
    """Zero-shot metrics on the test set. `attack`: also the ASR of that attack's triggered test images
    (default: the attack a backdoored stand-in was trained with)."""
    cache = cache or Cache()
    test = load_split(dataset, data_root, False, cache=cache)
    logits = zero_shot_logits(clip, test.images, dataset, test.classes, templates=templates, cache=cache)
    predicted = logits.argmax(1)
    names = class_prompt_names(dataset, test.classes, "ensemble")
    per_class = {names[c]: float((predicted[test.labels == c] == c).float().mean())
                 for c in range(test.num_classes) if (test.labels == c).any()}
    probs = torch.softmax(clip.logit_scale * logits, dim=1)
    out = {"clip": clip.spec, "source": clip.source, "dataset": dataset, "templates": templates,
           "n_test": len(test), "zero_shot_acc": accuracy(logits, test.labels), "per_class_acc": per_class,
           "ece": expected_calibration_error(probs, test.labels), "logit_scale": clip.logit_scale}
    attack = attack or (clip.source.get("pool", {}).get("backdoor") or {}).get("attack")
    if attack:
        from ..attacks.poison import trigger_test_set
        from ..registry import create_attack

        triggered = trigger_test_set(create_attack(attack), test)
        trig_logits = zero_shot_logits(clip, triggered.images, dataset, test.classes, templates=templates, cache=cache)
        out["attack"] = attack
        out["zero_shot_asr"] = attack_success_rate(trig_logits, triggered.attack_labels)
        out["triggered_acc"] = accuracy(trig_logits, triggered.true_labels)
    return out
