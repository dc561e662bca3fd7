"""`abl`: Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li & Ma, "Anti-Backdoor Learning: Training
Clean Models on Poisoned Data", NeurIPS 2021).

Backdoor samples are learned much faster than clean ones. ABL trains a fresh model on the poisoned
set with the local gradient ascent (LGA) loss sign(L - gamma) * L, which holds the training loss
near gamma: clean samples cannot drop below it, backdoor samples still do. The lowest-loss
`isolation_ratio` of the training set is isolated; the model trains on the rest and finally
unlearns the isolated set by gradient ascent.

Constants (the `paper` preset) and where they come from:
- gamma 0.5, isolation ratio 1%, 20 isolation epochs: paper Section 4 ("T_te = 20") and
  BackdoorBench `config/defense/abl/cifar10.yaml` (`tuning_epochs: 20`; the authors' `config.py`
  defaults to 10).
- SGD lr 0.1, momentum 0.9, Nesterov, weight decay 1e-4, batch 64: the authors' `config.py` and
  `backdoor_isolation.py`; constant lr during isolation (`adjust_learning_rate`).
- 60 fine-tuning epochs on the other 99%, lr 0.1 then 0.01 from epoch 40: `backdoor_unlearning.py`
  (`finetuning_epochs`, `learning_rate_finetuning`).
- 5 unlearning epochs at lr 5e-4 on the isolated set without augmentation: `config.py`
  (`unlearning_epochs`, `lr_unlearning_init`) and `backdoor_unlearning.py` (`tf_compose_unlearning`).

Where we differ from the authors' code, and why:
- LGA is applied to the batch-mean loss, as in their `train_step`; isolation ranks every sample's
  loss in eval mode without augmentation, and isolates the *lowest* losses, as the paper, README and
  BackdoorBench do (their `backdoor_isolation.py` sorts with `argsort(-loss)`, the highest).
- Their unlearning loop spends its first epoch evaluating on the test set, so 4 ascent epochs run
  there; we run all `unlearning_epochs` and never look at the test set.
- Fine-tuning uses random crop + flip; the authors add Cutout(1, 3), which the shared trainer lacks.
- Each stage starts a fresh optimizer (theirs carries SGD momentum across stages).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.datasets import ImageData
from ..harness.trainer import Batch, TrainConfig, predict, train
from .base import Defense, Split, register_defense
from .semisup import lowest_fraction


def lga_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """ABL's local gradient ascent on the batch-mean cross-entropy L: sign(L - gamma) * L, i.e.
    descent above gamma and ascent below it (the authors' `train_step`, `LGA` branch)."""
    loss = F.cross_entropy(logits.float(), labels)
    return torch.sign(loss - gamma) * loss


def _gradient_ascent(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """ABL's unlearning step: ascend the cross-entropy of the isolated samples."""
    return -F.cross_entropy(logits, batch.y)


@register_defense("abl")
class ABL(Defense):
    threat_model = "poisoned-data"

    class Params(Defense.Params):
        gamma: float = Field(0.5, gt=0, description="LGA loss floor (paper: 0.5)")
        isolation_ratio: float = Field(0.01, gt=0, lt=1, description="share of lowest-loss samples isolated (1%)")
        isolation_epochs: float = Field(20, gt=0, description="epochs of LGA training before isolating (T_te)")
        finetune_epochs: float = Field(60, ge=0, description="epochs of CE training on the non-isolated part")
        finetune_lr_drop: float = Field(0.6667, gt=0, le=1,
                                        description="share of fine-tuning after which lr drops 10x (40 of 60 epochs)")
        unlearning_epochs: float = Field(5, gt=0, description="epochs of gradient ascent on the isolated set")
        lr: float = Field(0.1, gt=0, description="isolation and fine-tuning learning rate")
        unlearning_lr: float = Field(5e-4, gt=0)
        batch_size: int = Field(64, ge=1)
        momentum: float = Field(0.9, ge=0, lt=1)
        weight_decay: float = Field(1e-4, ge=0)

    def _config(self, context, *, epochs: float, lr: float, schedule: str = "constant", augment: bool = True,
                milestones: list[float] | None = None) -> TrainConfig:
        p = self.params
        base = context.preset.train
        return TrainConfig(epochs=epochs, batch_size=p.batch_size, optimizer="sgd", lr=lr, momentum=p.momentum,
                           nesterov=True, weight_decay=p.weight_decay, schedule=schedule,
                           milestones=milestones or [0.5, 0.75], label_smoothing=0.0, augment=augment,
                           crop_padding=4, flip=True, precision=base.precision, channels_last=base.channels_last)

    def stage_work(self, n_train: int) -> dict[str, float]:
        p = self.params
        return {"isolation": p.isolation_epochs * n_train,
                "finetune": p.finetune_epochs * (1 - p.isolation_ratio) * n_train,
                "unlearning": p.unlearning_epochs * p.isolation_ratio * n_train}

    def fit(self, model, train_set: ImageData, *, val_set=None, clean_subset=None, context) -> "ABL":
        """Train a fresh model of `model`'s architecture on `train_set` (ABL trains from scratch; the
        backdoored `model` itself is not used)."""
        from ..harness.pipeline import build_model  # deferred: the pipeline imports this package

        p = self.params
        images, labels = train_set.images, train_set.labels
        torch.manual_seed(context.seed)
        net = build_model(context.preset, context.dataset, len(context.classes))

        with context.stage("isolation"):
            train(net, images, labels, self._config(context, epochs=p.isolation_epochs, lr=p.lr),
                  seed=context.seed, loss_fn=lambda logits, b: lga_loss(logits, b.y, p.gamma),
                  device=context.device, desc="abl: LGA isolation training")
            logits = predict(net, images, device=context.device, precision=context.preset.train.precision)
            losses = F.cross_entropy(logits, labels, reduction="none")
            isolated = lowest_fraction(losses, p.isolation_ratio)
        rest = torch.nonzero(~isolated).flatten()
        with context.stage("finetune"):
            if p.finetune_epochs > 0:
                train(net, images, labels,
                      self._config(context, epochs=p.finetune_epochs, lr=p.lr, schedule="multistep",
                                   milestones=[p.finetune_lr_drop]),
                      seed=context.seed + 1, indices=rest, device=context.device, desc="abl: fine-tune on the rest")
        with context.stage("unlearning"):
            train(net, images, labels,
                  self._config(context, epochs=p.unlearning_epochs, lr=p.unlearning_lr, augment=False),
                  seed=context.seed + 2, indices=torch.nonzero(isolated).flatten(), loss_fn=_gradient_ascent,
                  device=context.device, desc="abl: unlearn the isolated set")

        self.model_ = net.eval()
        # A low loss under the LGA-trained model is what ABL calls suspicious: the score is its negation.
        self.split_ = Split(clean=~isolated, suspect=isolated, scores={"neg_isolation_loss": -losses},
                            info={"rule": f"lowest {p.isolation_ratio:.2%} of the LGA-trained model's losses"})
        self.info_ = {"n_isolated": int(isolated.sum()), "n_rest": len(rest),
                      "isolation_loss_threshold": float(losses[isolated].max()) if isolated.any() else None,
                      "isolation_mean_loss": float(losses.mean())}
        return self
