"""`nad`: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021).

A teacher is the backdoored model fine-tuned on the clean data; the student (the backdoored model
again) is then fine-tuned with cross-entropy plus the attention-transfer loss of Zagoruyko &
Komodakis (ICLR 2017) between its stage outputs and the teacher's: attention = the mean over
channels of |a|^p (p = 2), flattened and L2-normalised per sample, compared by mean squared error.

Constants from the paper and BackdoorBench's `config/defense/nad/cifar10.yaml`: betas 500, 1000,
1000 on the last three stages (BackdoorBench's layer2-4 of PreActResNet-18; the paper's three WRN
groups), p = 2, a 10-epoch teacher, lr 0.01. Schedules count passes over a reference-sized clean set
(see clean_source.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat

from ..errors import CGDError, ConfigError
from ..harness.precision import autocast, resolve_device, use_bf16
from ..harness.trainer import Batch, train
from .base import Defense, register_defense
from .clean_source import CleanDataParams, resolve_clean_data


def attention_map(activation: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): mean over channels of |a|^p, L2-normalised per sample."""
    att = activation.float().abs().pow(p).mean(1).flatten(1)
    return att / (att.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


class StageRecorder:
    """Forward hooks keeping the latest outputs of the given stages."""

    def __init__(self, stages):
        self.outputs: list[torch.Tensor | None] = [None] * len(stages)
        self._handles = [stage.register_forward_hook(self._hook(i)) for i, stage in enumerate(stages)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            self.outputs[i] = output
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@register_defense("nad")
class NAD(Defense):
    threat_model = "clean-subset"

    class Params(CleanDataParams):
        teacher_epochs: float = Field(10, gt=0, description="teacher fine-tuning passes (BackdoorBench te_epochs)")
        epochs: float = Field(100, gt=0, description="distillation passes over a reference-sized clean set")
        lr: float = Field(0.01, gt=0)
        batch_size: int = Field(256, ge=1)
        betas: list[NonNegativeFloat] = Field(default_factory=lambda: [500.0, 1000.0, 1000.0], min_length=1,
                                   description="attention-loss weights of the last len(betas) stages")
        p: float = Field(2.0, gt=0, description="power of the attention map")

    def fit(self, model, train_set, *, val_set=None, clean_subset=None, context):
        p = self.params
        if clean_subset is not None:
            raise CGDError("defense 'nad' takes its clean data from clean_source (oracle | cgd | random), "
                           "not from clean_subset")
        if len(p.betas) > len(model.stages):
            raise ConfigError(f"defense 'nad': betas must hold at most {len(model.stages)} weights (one per stage of "
                              f"{type(model.net).__name__}, counted from the last). Got {p.betas} instead")
        with context.stage("clean_data"):
            clean = resolve_clean_data(p, train_set, context, self.name, val_set=val_set)
        device = resolve_device(context.device)
        bf16 = use_bf16(context.preset.train.precision, device)

        with context.stage("teacher"):
            teacher = copy.deepcopy(model)
            teacher_cfg = clean.train_config(context.preset.train, epochs=p.teacher_epochs, lr=p.lr,
                                             batch_size=p.batch_size)
            train(teacher, clean.data.images, clean.data.labels, teacher_cfg, seed=context.seed, device=device,
                  desc="nad teacher")

        with context.stage("distil"):
            student = copy.deepcopy(model)
            n = len(p.betas)
            student_rec, teacher_rec = StageRecorder(student.stages[-n:]), StageRecorder(teacher.stages[-n:])
            cfg = clean.train_config(context.preset.train, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size)

            def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
                with torch.no_grad(), autocast(bf16, device):
                    teacher(batch.x)
                loss = F.cross_entropy(logits, batch.y, label_smoothing=cfg.label_smoothing)
                for beta, s_act, t_act in zip(p.betas, student_rec.outputs, teacher_rec.outputs):
                    loss = loss + beta * attention_loss(s_act, t_act.detach(), p.p)
                return loss

            teacher.eval()
            try:
                train(student, clean.data.images, clean.data.labels, cfg, seed=context.seed + 1, device=device,
                      loss_fn=loss_fn, desc="nad distil")
            finally:
                student_rec.remove()
                teacher_rec.remove()

        self.model_ = student.eval()
        self.info_ = {**clean.info, "teacher_steps": clean.steps(p.teacher_epochs, p.batch_size),
                      "distil_steps": clean.steps(p.epochs, p.batch_size), "distilled_stages": n}
        return self
