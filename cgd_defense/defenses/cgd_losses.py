"""CGD's retraining objective and its CLIP teacher.

Loss per batch (`4backdoorbench/cgd.py:167-185,318-342`; docs/reference/cgd_reference.md section 4),
with z the student's logits and y the given labels:

    CE(z[clean], y[clean])                                          mean over the batch's clean rows
  + alpha * T^2 * KL(softmax(t[S] / T) || softmax(z[S] / T))        batchmean over the suspect rows S
  + beta * mean_S log(softmax(z[S])[y] + 1e-6)                      unlearning: minimising pushes p_y down

Each term is averaged over its own rows; rows of the "rest" go through the forward pass (and so
through BatchNorm's statistics) but get no loss, as in the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness.trainer import Batch

ROLE_REST, ROLE_CLEAN, ROLE_SUSPECT = 0, 1, 2
UNLEARNING_FLOOR = 1e-6  # log(p_y + 1e-6) >= log(1e-6): the unlearning term is bounded (`cgd.py:183`)


def distillation_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows (KLDivLoss
    'batchmean'). The T^2 keeps the gradient's scale independent of T (Hinton et al., 2015)."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature ** 2


def unlearning_term(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean log(p(given label) + 1e-6): added with a + sign, so descent lowers p(given label)."""
    p_y = F.softmax(student_logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    return torch.log(p_y + UNLEARNING_FLOOR).mean()


def cgd_loss(logits: torch.Tensor, labels: torch.Tensor, roles: torch.Tensor, teacher_logits: torch.Tensor,
             alpha: float, temperature: float, beta: float) -> torch.Tensor:
    """The CGD objective for one batch; `roles` and `teacher_logits` are the batch's rows."""
    clean = roles == ROLE_CLEAN
    suspect = roles == ROLE_SUSPECT
    loss = logits.sum() * 0.0  # keeps a graph when the batch holds only "rest" rows
    if clean.any():
        loss = loss + F.cross_entropy(logits[clean], labels[clean])
    if suspect.any():
        z = logits[suspect]
        loss = loss + alpha * distillation_term(z, teacher_logits[suspect], temperature) \
            + beta * unlearning_term(z, labels[suspect])
    return loss


class CGDObjective:
    """`loss_fn(logits, batch)` for the project trainer: looks up each row's role and teacher
    logits by `batch.idx` (indices into the training set)."""

    def __init__(self, roles: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, temperature: float,
                 beta: float):
        self.roles = roles
        self.teacher_logits = teacher_logits.float()
        self.alpha, self.temperature, self.beta = alpha, temperature, beta

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        idx = batch.idx.cpu()
        return cgd_loss(logits, batch.y, self.roles[idx].to(logits.device),
                        self.teacher_logits[idx].to(logits.device), self.alpha, self.temperature, self.beta)


def fit_temperature_scale(cosines: torch.Tensor, labels: torch.Tensor) -> float:
    """The logit scale s minimising the mean NLL of `labels` under softmax(s * cosines): temperature
    scaling (Guo et al., 2017) on a log grid over [1, 1000] refined around its best point. The
    labels are the validation split's given labels, so poisons pull s slightly down (softer)."""
    cos = cosines.double()

    def nll(scale: float) -> float:
        return float(F.cross_entropy(cos * scale, labels.long()))

    grid = torch.logspace(0, 3, 61, dtype=torch.float64).tolist()
    best = min(grid, key=nll)
    fine = torch.linspace(best / 1.13, best * 1.13, 41, dtype=torch.float64).tolist()
    return float(min(fine, key=nll))
