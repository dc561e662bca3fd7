"""Pieces shared by the poisoned-data baselines: the lowest-score split rule (ABL, DBD, ASD), the
symmetric cross-entropy DBD and ASD score samples with, and MixMatch (Berthelot et al., NeurIPS
2019), which both use to train on a labelled "clean" pool and an unlabelled rest.

Constants follow the authors' configs, which agree: DBD `config/defense/mixmatch_finetune/*/
example.yaml` and ASD `config/baseline_asd.yaml` (both `semi.mixmatch`: temperature 0.5, alpha 0.75,
batch 64, 1024 iterations per epoch, lambda_u 15 ramped up linearly; Adam lr 0.002, no schedule;
SCE alpha 0.1, beta 1).

Why MixMatch has its own loop rather than `harness.trainer.train`: each step draws two batches from
two pools (labelled, unlabelled), augments each unlabelled image twice, guesses labels with the
model, then mixes all of it; the trainer's one-pool `(logits, batch)` loop cannot express that. The
loop reuses the trainer's pieces (optimizer, batched augmentation, precision policy).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..harness.augment import random_crop_flip
from ..harness.precision import autocast, resolve_device, use_bf16
from ..harness.trainer import init_from_data_once, predict

log = logging.getLogger(__name__)


def symmetric_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.1,
                            beta: float = 1.0) -> torch.Tensor:
    """Per-sample SCE = alpha * CE + beta * RCE (Wang et al., ICCV 2019), as DBD's `model/loss.py`
    computes it: RCE = -sum_k p_k log q_k with the softmax p clamped to [1e-7, 1] and the one-hot
    label q clamped to [1e-4, 1], i.e. RCE = -log(1e-4) * (mass the model puts off the label)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    prob = logits.softmax(1).clamp(min=1e-7, max=1.0)
    one_hot = F.one_hot(labels, logits.shape[1]).float().clamp(min=1e-4, max=1.0)
    rce = -(prob * one_hot.log()).sum(1)
    return alpha * ce + beta * rce


def lowest_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the `int(N * fraction)` lowest scores (at least one for a positive fraction;
    ties broken by index)."""
    n = max(1, int(len(scores) * fraction)) if fraction > 0 else 0
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[torch.argsort(scores, stable=True)[:n]] = True
    return mask


def sharpen(prob: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's sharpening: p_k^(1/T), renormalised (T -> 0 gives the one-hot argmax)."""
    powered = prob.pow(1.0 / temperature)
    return powered / powered.sum(1, keepdim=True)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, rng: np.random.Generator,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixMatch's MixUp: lambda ~ Beta(alpha, alpha), lambda' = max(lambda, 1 - lambda), so each mixed
    sample stays closer to its own original; partners are a random permutation of the batch."""
    lam = float(rng.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(len(inputs), generator=generator).to(inputs.device)
    return lam * inputs + (1 - lam) * inputs[perm], lam * targets + (1 - lam) * targets[perm], lam


def mixmatch_loss(labeled_logits: torch.Tensor, labeled_targets: torch.Tensor, unlabeled_logits: torch.Tensor,
                  unlabeled_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_x, L_u): soft-target cross-entropy on the labelled part, mean squared error between
    probabilities and guessed targets on the unlabelled part (averaged over classes too, as in
    the MixMatch code that DBD and ASD reuse)."""
    lx = -(F.log_softmax(labeled_logits.float(), 1) * labeled_targets).sum(1).mean()
    lu = ((unlabeled_logits.float().softmax(1) - unlabeled_targets) ** 2).mean()
    return lx, lu


@dataclass
class MixMatchConfig:
    iterations: int = 1024   # steps per MixMatch epoch
    batch_size: int = 64     # labelled and unlabelled batch size each
    temperature: float = 0.5
    alpha: float = 0.75
    lambda_u: float = 15.0   # DBD's comment: 75 * (200 / 1024) ~= 15
    rampup_epochs: float = 190.0  # lambda_u grows linearly to its value over this many epochs
    crop_padding: int = 4    # the authors' RandomCrop(32, padding=4) + horizontal flip
    precision: str = "auto"
    channels_last: bool = True


def mixmatch_config(params, train_cfg) -> MixMatchConfig:
    """The MixMatch settings of a defense whose Params carry semi_iterations, semi_batch_size,
    mixmatch_temperature, mixmatch_alpha, lambda_u and rampup_epochs (DBD, ASD), with the preset's
    precision and memory format."""
    return MixMatchConfig(iterations=params.semi_iterations, batch_size=params.semi_batch_size,
                          temperature=params.mixmatch_temperature, alpha=params.mixmatch_alpha,
                          lambda_u=params.lambda_u, rampup_epochs=params.rampup_epochs, crop_padding=4,
                          precision=train_cfg.precision, channels_last=train_cfg.channels_last)


class _IndexStream:
    """Endless shuffled batches of a pool, reshuffled at each pass (a DataLoader with shuffle and
    drop_last, restarted when exhausted, as the authors' loops do). A pool smaller than the batch
    yields the whole pool each time."""

    def __init__(self, pool: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.pool = pool
        self.batch_size = min(batch_size, len(pool))
        self.generator = generator
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order = self.pool[torch.randperm(len(self.pool), generator=self.generator)]
            self.pos = 0
        batch = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch


def mixmatch_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor,
                   unlabeled: torch.Tensor, optimizer: torch.optim.Optimizer, cfg: MixMatchConfig, *,
                   epoch: int, num_classes: int, generator: torch.Generator, rng: np.random.Generator,
                   device=None) -> dict:
    """One MixMatch epoch (`cfg.iterations` steps) of `model` on uint8 `images`: `labeled` indices
    keep their given labels, `unlabeled` ones get sharpened guesses. `epoch` (counted as the authors
    count it) drives the lambda_u ramp-up. Returns the epoch's mean losses."""
    if cfg.iterations < 1:
        raise ValueError(f"MixMatch needs at least one iteration per epoch, got {cfg.iterations}")
    if len(labeled) == 0 or len(unlabeled) == 0:
        raise ValueError(f"MixMatch needs both pools: {len(labeled)} labelled, {len(unlabeled)} unlabelled samples")
    device = resolve_device(device)
    bf16 = use_bf16(cfg.precision, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # A fixed draw (seed 0), so that `generator`'s stream, and with it every recorded run, is unchanged.
    init_from_data_once(model, images, torch.cat([torch.as_tensor(labeled), torch.as_tensor(unlabeled)]).long(), 0)
    model.to(device=device, memory_format=memory_format).train()
    x_stream = _IndexStream(torch.as_tensor(labeled, dtype=torch.long), cfg.batch_size, generator)
    u_stream = _IndexStream(torch.as_tensor(unlabeled, dtype=torch.long), cfg.batch_size, generator)

    def augmented(idx: torch.Tensor) -> torch.Tensor:
        x = images[idx].to(device).float().div_(255)
        return random_crop_flip(x, cfg.crop_padding, True, generator).contiguous(memory_format=memory_format)

    def ramp(progress: float) -> float:
        return 1.0 if cfg.rampup_epochs <= 0 else min(max(progress / cfg.rampup_epochs, 0.0), 1.0)

    totals = {"loss": 0.0, "loss_x": 0.0, "loss_u": 0.0}
    for it in range(cfg.iterations):
        x_idx, u_idx = x_stream.next(), u_stream.next()
        x = augmented(x_idx)
        x_targets = F.one_hot(labels[x_idx].to(device), num_classes).float()
        u1, u2 = augmented(u_idx), augmented(u_idx)
        with torch.no_grad(), autocast(bf16, device):
            guess = (model(u1).float().softmax(1) + model(u2).float().softmax(1)) / 2
        u_targets = sharpen(guess.float(), cfg.temperature)
        mixed_x, mixed_t, _ = mixup(torch.cat([x, u1, u2]), torch.cat([x_targets, u_targets, u_targets]),
                                    cfg.alpha, rng, generator)
        # One forward over the whole mixed batch: BatchNorm then sees labelled and unlabelled samples
        # together, which is what the authors' `interleave` of three separate forwards emulates.
        with autocast(bf16, device):
            logits = model(mixed_x.contiguous(memory_format=memory_format)).float()
        n_x = len(x_idx)
        loss_x, loss_u = mixmatch_loss(logits[:n_x], mixed_t[:n_x], logits[n_x:], mixed_t[n_x:])
        loss = loss_x + cfg.lambda_u * ramp(epoch + it / cfg.iterations) * loss_u
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["loss"] += float(loss.detach())
        totals["loss_x"] += float(loss_x.detach())
        totals["loss_u"] += float(loss_u.detach())
    model.eval()
    out = {k: v / cfg.iterations for k, v in totals.items()}
    out["lambda_u"] = cfg.lambda_u * ramp(epoch + 1)
    return out


def per_sample_sce(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.1,
                   beta: float = 1.0, batch_size: int = 1024, device=None, precision: str = "auto") -> torch.Tensor:
    """Every sample's SCE loss under `model` in eval mode, without augmentation (what DBD and ASD
    rank samples by)."""
    logits = predict(model, images, batch_size=batch_size, device=device, precision=precision)
    return symmetric_cross_entropy(logits, labels, alpha=alpha, beta=beta)


def split_and_mixmatch(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       optimizer: torch.optim.Optimizer, cfg: MixMatchConfig, *, epochs: int,
                       choose_pool: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]],
                       sce_alpha: float, sce_beta: float, num_classes: int, seed: int, stage,
                       report: Callable[[torch.Tensor], float] | None = None, first_epoch: int = 0,
                       val: tuple[torch.Tensor, torch.Tensor] | None = None, device=None,
                       precision: str = "auto") -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """The loop DBD and ASD share. Each epoch: every sample's SCE loss under the current model,
    `choose_pool(epoch, losses) -> (labelled-pool mask, the score it ranked by, trace fields)`, then
    one MixMatch epoch with the pool labelled and the rest unlabelled; `stage(name)` times both (a
    `DefenseContext.stage`). `first_epoch` offsets the
    lambda_u ramp-up (DBD counts its warm-up epochs in it). `report(indices)` gives the poison rate of
    a pool from the ground truth, for result.json only. With `val` (images, given labels of the
    validation split), each epoch also records the model's accuracy there, `val_acc`: a learning
    curve that shows whether the schedule left the model under-trained. It is reported, never used
    to pick an epoch. Returns the per-epoch trace and the last epoch's pool and score."""
    gen = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    trace: list[dict] = []
    pool = score = None
    for epoch in range(epochs):
        with stage("split"):
            losses = per_sample_sce(net, images, labels, alpha=sce_alpha, beta=sce_beta, device=device,
                                    precision=precision)
            pool, score, fields = choose_pool(epoch, losses)
        labelled, unlabelled = torch.nonzero(pool).flatten(), torch.nonzero(~pool).flatten()
        with stage("mixmatch"):
            stats = mixmatch_epoch(net, images, labels, labelled, unlabelled, optimizer, cfg,
                                   epoch=first_epoch + epoch, num_classes=num_classes, generator=gen, rng=rng,
                                   device=device)
        if val is not None:
            val_logits = predict(net, val[0], device=device, precision=precision)
            stats["val_acc"] = float((val_logits.argmax(1) == val[1]).float().mean())
        trace.append({"epoch": epoch + 1, **fields, "pool": len(labelled),
                      "pool_poison_rate": report(labelled) if report is not None else None, **stats})
        log.info("MixMatch epoch %d/%d: %d labelled, %s", epoch + 1, epochs, len(labelled),
                 ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in trace[-1].items()
                           if k not in ("epoch", "pool") and v is not None))
    return trace, pool, score
