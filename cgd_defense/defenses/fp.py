"""`fp`: Fine-Pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks
on Deep Neural Networks", RAID 2018).

Backdoor neurons tend to lie dormant on clean inputs. Fine-Pruning ranks the channels of the last
convolutional stage by their mean activation on clean data, prunes them from the least active up
while clean accuracy holds, then fine-tunes the pruned network on the clean data.

Where we differ from BackdoorBench's `defense/fp.py` (whose constants we keep: 1% of the channels
per step, a 10% relative accuracy tolerance, 100 fine-tuning epochs at lr 0.01):
- The pruning depth is chosen on a held-out part of the defense's own clean data, never on the test
  set. Not on the harness's `val_set` either: it is carved from the poisoned pool, so removing the
  backdoor lowers its accuracy (poisoned samples stop matching their attack labels) and a tolerance
  on it would penalise the very effect wanted; and with `clean_source=cgd` the defense may see
  nothing but CGD's clean part. Those held-out samples were in the victim's training set, like all
  of the clean data these defenses receive.
- The kept mask is a copy of the last accepted step (BackdoorBench keeps the mask of the failed one)
  and is baked into the weights: the only consumer of the last stage's output is global pooling and
  the classifier, so zeroing a channel's classifier column removes its every effect, and the state
  dict still loads strictly into the same architecture. A gradient hook keeps those columns at zero
  through fine-tuning.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from pydantic import Field

from ..data.splits import stratified_holdout
from ..errors import CGDError
from ..harness.precision import autocast, resolve_device, use_bf16
from ..harness.trainer import train
from ..models import Classifier
from .base import Defense, register_defense
from .clean_source import CleanDataParams, resolve_clean_data


def last_stage_statistics(model: Classifier, images: torch.Tensor, *, batch_size: int = 512, device=None,
                          precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the spatial mean activation of each channel of `model.stages[-1]` (what FP ranks
    by) and the pooled features the classifier reads (what the pruning loop scores)."""
    device = resolve_device(device)
    bf16 = use_bf16(precision, device)
    model.to(device).eval()  # outside inference mode: FP fine-tunes this model afterwards (see `predict`)
    captured: list[torch.Tensor] = []
    handle = model.stages[-1].register_forward_hook(lambda m, i, out: captured.append(out.float().mean((2, 3)).cpu()))
    features = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(device)
                x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
                with autocast(bf16, device):
                    features.append(model.forward_features(x).float().cpu())
    finally:
        handle.remove()
    return torch.cat(captured), torch.cat(features)


@torch.no_grad()
def choose_pruned_channels(features: torch.Tensor, labels: torch.Tensor, classifier: nn.Linear, order: torch.Tensor,
                           *, step: float, tolerance: float) -> tuple[torch.Tensor, list[dict]]:
    """Prune channels in `order` (least active first), `ceil(step * C)` at a time, while accuracy on
    (`features`, `labels`) stays within `tolerance` (relative drop) of the unpruned model's.

    Returns the keep mask of the deepest accepted step (a copy) and the trace of every step tried.
    Zeroing feature columns is exactly what the baked mask does to the classifier's input, and the
    classifier is linear, so scoring on precomputed features is exact.
    """
    n_channels = features.shape[1]
    per_step = max(1, math.ceil(step * n_channels))
    weight = classifier.weight.detach().float().cpu()
    bias = classifier.bias.detach().float().cpu() if classifier.bias is not None else None

    def accuracy(keep: torch.Tensor) -> float:
        logits = (features * keep) @ weight.T
        if bias is not None:
            logits = logits + bias
        return float((logits.argmax(1) == labels).float().mean())

    keep = torch.ones(n_channels)
    base = accuracy(keep)
    trace = [{"n_pruned": 0, "accuracy": base}]
    accepted = keep.clone()
    for n_pruned in range(per_step, n_channels + 1, per_step):
        keep = torch.ones(n_channels)
        keep[order[:n_pruned]] = 0
        acc = accuracy(keep)
        trace.append({"n_pruned": n_pruned, "accuracy": acc})
        if base - acc > tolerance * base:
            break
        accepted = keep.clone()
    return accepted.bool(), trace


@torch.no_grad()
def apply_channel_mask(model: Classifier, keep: torch.Tensor) -> None:
    """Remove the last stage's channels where `keep` is False by zeroing their classifier columns."""
    model.classifier.weight[:, ~keep.to(model.classifier.weight.device)] = 0


@register_defense("fp")
class FinePruning(Defense):
    threat_model = "clean-subset"

    class Params(CleanDataParams):
        acc_tolerance: float = Field(0.1, ge=0, lt=1, description="largest relative drop of held-out clean accuracy "
                                     "while pruning (BackdoorBench acc_ratio)")
        prune_step: float = Field(0.01, gt=0, le=1, description="share of the channels pruned per step "
                                  "(BackdoorBench once_prune_ratio)")
        holdout: float = Field(0.2, gt=0, lt=1, description="share of the clean data held out to score pruning")
        epochs: float = Field(100, gt=0, description="fine-tuning passes over a reference-sized clean set")
        lr: float = Field(0.01, gt=0)
        batch_size: int = Field(256, ge=1)

    def fit(self, model, train_set, *, val_set=None, clean_subset=None, context):
        p = self.params
        if clean_subset is not None:
            raise CGDError("defense 'fp' takes its clean data from clean_source (oracle | cgd | random), "
                           "not from clean_subset")
        with context.stage("clean_data"):
            clean = resolve_clean_data(p, train_set, context, self.name, val_set=val_set)

        with context.stage("prune"):
            model = copy.deepcopy(model)
            rank_pos, score_pos = stratified_holdout(clean.data.labels, p.holdout, context.seed)
            if len(score_pos) == 0 or len(rank_pos) == 0:
                raise CGDError(f"defense 'fp': {len(clean)} clean samples are too few to hold out {p.holdout:.0%} "
                               f"for scoring the pruning; raise fraction or holdout")
            precision = context.preset.train.precision
            activation, features = last_stage_statistics(model, clean.data.images, device=context.device,
                                                         precision=precision)
            order = torch.argsort(activation[rank_pos].mean(0))
            keep, trace = choose_pruned_channels(features[score_pos], clean.data.labels[score_pos], model.classifier,
                                                 order, step=p.prune_step, tolerance=p.acc_tolerance)
            apply_channel_mask(model, keep)

        with context.stage("finetune"):
            cfg = clean.train_config(context.preset.train, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size)
            weight = model.classifier.weight
            hook = weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
            try:
                train(model, clean.data.images, clean.data.labels, cfg, seed=context.seed, device=context.device,
                      desc="fp fine-tune")
            finally:
                hook.remove()

        n_pruned = int((~keep).sum())
        self.model_ = model.eval()
        self.info_ = {**clean.info, "n_channels": len(keep), "n_pruned": n_pruned,
                      "pruned_channels": torch.nonzero(~keep).flatten().tolist(),
                      "n_scoring_samples": len(score_pos),
                      "scoring_accuracy_before": trace[0]["accuracy"],
                      "scoring_accuracy_pruned": next(t["accuracy"] for t in trace if t["n_pruned"] == n_pruned),
                      "prune_trace": trace, "finetune_steps": clean.steps(p.epochs, p.batch_size)}
        return self
