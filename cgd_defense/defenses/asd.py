"""`asd`: Adaptive Splitting Defense (Gao, Bai, Gu, Yang, Xia & Ma, "Backdoor Defense via Adaptively
Splitting Poisoned Dataset", CVPR 2023).

ASD trains a fresh model by semi-supervised MixMatch on a labelled "clean pool" and the unlabelled
rest, and re-splits the data before every epoch, in three stages:
1. class-aware loss-guided split: the clean pool is a few trusted seed samples per class plus, per
   (given) class, the `choice_num` lowest-SCE-loss samples; `choice_num` grows by `n` every `t`
   epochs, so the pool starts tiny and grows;
2. class-agnostic loss-guided split: the lowest-SCE-loss `epsilon` (50%) of all samples;
3. meta-split: a copy of the model trains one epoch on the whole poisoned set (only its last two
   stages and head, Adam lr 0.015); poisoned samples, learned fastest, see their loss drop most, so
   the pool is the `epsilon` samples whose loss drops least (loss - loss after the virtual epoch).

Constants (the `paper` preset) from the authors' `config/baseline_asd.yaml` (KuofengGao/ASD):
120 epochs, stages end at epochs 60 / 90 / 120, 10 seeds per class, t = 5, n = 10, epsilon 0.5,
split criterion SCE (alpha 0.1, beta 1), meta Adam lr 0.015 for 1 epoch over batches of 128 on
`layer3`, `layer4` and the head (here: the model's last two stages and its classifier), MixMatch as
in `semisup.py` with lambda_u 15 ramped over the 120 epochs, Adam lr 0.002 without schedule.

Seed samples. ASD assumes the defender holds 10 trusted clean samples per class; the authors'
`ASD.py` draws them from the training samples that are truly clean (`item['poison'] == 0`). We do
the same through the harness's `context.oracle_clean_subset` (truly clean training samples,
seeded), recorded in `info_` with their poison rate. Those samples are part of the training set
the defense receives, exactly as in the authors' code; no data outside it is used. A class with
too few truly clean samples (clean-label attacks that poison a whole class, e.g. SIG with
BackdoorBench's ratio) gets the rest of its seeds from its other samples, recorded as
`seed_fill_ins` with the seeds' poison rate.

Where we differ, and why:
- Samples are ranked by their loss in eval mode without augmentation (the authors' record pass
  reuses the training transform).
- The final model is the last epoch's; the authors keep the best epoch by *test* accuracy.
"""
from __future__ import annotations

import copy

import torch
from pydantic import Field, model_validator

from ..data.datasets import ImageData
from ..errors import CGDError
from ..harness.trainer import TrainConfig, make_optimizer, train
from ..models import Classifier
from .base import Defense, Split, register_defense
from .semisup import lowest_fraction, mixmatch_config, per_sample_sce, split_and_mixmatch


def class_aware_pool(losses: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor, per_class: int,
                     num_classes: int) -> torch.Tensor:
    """ASD stage 1: the seeds plus, in each given class, the `per_class` lowest-loss non-seed samples."""
    pool = torch.zeros(len(losses), dtype=torch.bool)
    pool[seeds] = True
    if per_class > 0:
        for c in range(num_classes):
            members = torch.nonzero((labels == c) & ~pool).flatten()
            pool[members[torch.argsort(losses[members], stable=True)[:per_class]]] = True
    return pool


def choice_num(epoch: int, t: int, n: int) -> int:
    """ASD stage 1's per-class pool growth: `n` more samples every `t` epochs, from 0 at epoch 0
    (the authors add `n` at each epoch divisible by `t` except 0)."""
    return n * (epoch // t)


def select_seeds(oracle_indices: torch.Tensor, labels: torch.Tensor, per_class: int, num_classes: int,
                 seed: int) -> tuple[torch.Tensor, dict[int, int]]:
    """`per_class` samples of each class drawn (seeded) from `oracle_indices`. A class with fewer is
    filled up with other training samples of that class, drawn the same way; returns the seeds and
    {class: number of fill-ins} for the classes that needed them."""
    g = torch.Generator().manual_seed(seed)
    shuffled = oracle_indices[torch.randperm(len(oracle_indices), generator=g)]
    outside = torch.ones(len(labels), dtype=torch.bool)
    outside[oracle_indices] = False
    others = torch.nonzero(outside).flatten()
    others = others[torch.randperm(len(others), generator=g)]
    chosen, shortfall = [], {}
    for c in range(num_classes):
        members = shuffled[labels[shuffled] == c][:per_class]
        if len(members) < per_class:
            fill = others[labels[others] == c][:per_class - len(members)]
            shortfall[c] = len(fill)
            members = torch.cat([members, fill])
        chosen.append(members)
    return torch.sort(torch.cat(chosen)).values, shortfall


@register_defense("asd")
class ASD(Defense):
    threat_model = "poisoned-data"

    class Params(Defense.Params):
        epochs: int = Field(120, ge=1, description="MixMatch epochs in all (each preceded by a re-split)")
        epoch_first: int = Field(60, ge=0, description="end of stage 1 (class-aware loss-guided split)")
        epoch_second: int = Field(90, ge=0, description="end of stage 2 (class-agnostic); meta-split after")
        seeds_per_class: int = Field(10, ge=1, description="trusted clean seed samples per class")
        t: int = Field(5, ge=1, description="stage 1: epochs between pool growths")
        n: int = Field(10, ge=0, description="stage 1: samples per class added at each growth")
        epsilon: float = Field(0.5, gt=0, lt=1, description="stages 2-3: share of samples in the clean pool")
        sce_alpha: float = Field(0.1, ge=0)
        sce_beta: float = Field(1.0, ge=0)
        meta_lr: float = Field(0.015, gt=0, description="virtual model's Adam lr (meta-split)")
        meta_epochs: float = Field(1, gt=0, description="virtual model's epochs over the poisoned set")
        meta_batch_size: int = Field(128, ge=1)
        semi_iterations: int = Field(1024, ge=1, description="MixMatch steps per epoch")
        semi_batch_size: int = Field(64, ge=1)
        lr: float = Field(0.002, gt=0, description="Adam lr of MixMatch")
        mixmatch_temperature: float = Field(0.5, gt=0)
        mixmatch_alpha: float = Field(0.75, gt=0)
        lambda_u: float = Field(15.0, ge=0)
        rampup_epochs: float = Field(120, ge=0, description="lambda_u ramp-up length in epochs")

        @model_validator(mode="after")
        def _stages_in_order(self):
            if not self.epoch_first <= self.epoch_second <= self.epochs:
                raise ValueError(f"stages must satisfy epoch_first <= epoch_second <= epochs, got "
                                 f"{self.epoch_first}, {self.epoch_second}, {self.epochs}")
            return self

    def _seeds(self, train_set: ImageData, context) -> tuple[torch.Tensor, dict]:
        p = self.params
        num_classes = len(context.classes)
        if context.oracle_clean_subset is None:
            raise CGDError("defense 'asd' needs its trusted seed samples (10 clean images per class in the paper), "
                           "which only the benchmark harness provides (context.oracle_clean_subset)")
        fraction = min(0.99, 4 * p.seeds_per_class * num_classes / len(train_set))
        while True:
            oracle_idx, _ = context.oracle_clean_subset(fraction)
            seeds, shortfall = select_seeds(torch.as_tensor(oracle_idx, dtype=torch.long), train_set.labels,
                                            p.seeds_per_class, num_classes, context.seed)
            if not shortfall or fraction >= 0.99:
                break
            fraction = min(0.99, 2 * fraction)
        report = context.report_poison_rate
        info = {"seed_source": "oracle_clean_subset: truly clean training samples drawn by the harness, as the "
                               "authors' ASD.py draws its seeds",
                "n_seeds": len(seeds), "seed_poison_rate": report(seeds) if report is not None else None}
        if shortfall:
            # e.g. SIG as BackdoorBench sets it poisons every target-class image: no clean seed of that class
            # exists in the training set, so the seeds of that class are whatever the class holds.
            info["seed_fill_ins"] = {str(c): k for c, k in shortfall.items()}
            info["seed_source"] += ("; classes without enough truly clean samples filled up with other "
                                    "samples of the class (seed_fill_ins)")
        return seeds, info

    def _meta_losses(self, net: Classifier, images: torch.Tensor, labels: torch.Tensor, context) -> torch.Tensor:
        """Loss of every sample under a copy of `net` trained `meta_epochs` on the whole poisoned set
        (last two stages and the classifier only, as the authors' `layer3`, `layer4`, `linear`)."""
        p = self.params
        virtual = copy.deepcopy(net)
        trainable = {id(q) for m in [*virtual.stages[-2:], virtual.classifier] for q in m.parameters()}
        for q in virtual.parameters():
            q.requires_grad_(id(q) in trainable)
        cfg = TrainConfig(epochs=p.meta_epochs, batch_size=p.meta_batch_size, optimizer="adam", lr=p.meta_lr,
                          weight_decay=0.0, schedule="constant", label_smoothing=0.0, crop_padding=4,
                          precision=context.preset.train.precision, channels_last=context.preset.train.channels_last)
        train(virtual, images, labels, cfg, seed=context.seed + 3, device=context.device, desc="asd: virtual model")
        return per_sample_sce(virtual, images, labels, alpha=p.sce_alpha, beta=p.sce_beta, device=context.device,
                              precision=context.preset.train.precision)

    def stage_work(self, n_train: int) -> dict[str, float]:
        p = self.params
        # Each split is one loss pass over the data; each meta-split adds the virtual model's training
        # epoch(s), counted as two passes (forward, plus the backward of the last two stages). The weight
        # only matters between settings whose meta and plain splits scale differently: the registered
        # presets scale both alike (quick -> paper: 12 -> 120 splits, 3 -> 30 meta-splits).
        meta_splits = p.epochs - p.epoch_second
        return {"seeds": 1.0, "split": (p.epochs + 2 * meta_splits * p.meta_epochs) * n_train,
                "mixmatch": p.epochs * p.semi_iterations * p.semi_batch_size}

    def fit(self, model, train_set: ImageData, *, val_set=None, clean_subset=None, context) -> "ASD":
        """Train a fresh model of `model`'s architecture on `train_set` (ASD trains from scratch; the
        backdoored `model` itself is not used)."""
        from ..harness.pipeline import build_model  # deferred: the pipeline imports this package

        p = self.params
        images, labels = train_set.images, train_set.labels
        num_classes = len(context.classes)
        precision = context.preset.train.precision
        with context.stage("seeds"):
            seeds, seed_info = self._seeds(train_set, context)
        torch.manual_seed(context.seed)
        net = build_model(context.preset, context.dataset, num_classes)
        optimizer = make_optimizer(net, TrainConfig(optimizer="adam", lr=p.lr, weight_decay=0.0))

        def choose_pool(epoch: int, losses: torch.Tensor):
            if epoch < p.epoch_first:
                return (class_aware_pool(losses, labels, seeds, choice_num(epoch, p.t, p.n), num_classes), losses,
                        {"stage": "class-aware"})
            if epoch < p.epoch_second:
                return lowest_fraction(losses, p.epsilon), losses, {"stage": "class-agnostic"}
            score = losses - self._meta_losses(net, images, labels, context)
            return lowest_fraction(score, p.epsilon), score, {"stage": "meta"}

        trace, pool, score = split_and_mixmatch(
            net, images, labels, optimizer, mixmatch_config(p, context.preset.train), epochs=p.epochs,
            choose_pool=choose_pool, sce_alpha=p.sce_alpha, sce_beta=p.sce_beta, num_classes=num_classes,
            seed=context.seed, stage=context.stage, report=context.report_poison_rate,
            val=(val_set.images, val_set.labels) if val_set is not None else None, device=context.device,
            precision=precision)
        stage = trace[-1]["stage"]

        self.model_ = net.eval()
        score_name = "loss_minus_meta_loss" if stage == "meta" else "sce_loss"
        self.split_ = Split(clean=pool, suspect=~pool, scores={score_name: score},
                            info={"rule": f"ASD clean pool of the last epoch ({stage} split)"})
        self.info_ = {**seed_info, "final_stage": stage, "epochs": trace}
        return self
