"""`anp`: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021).

Backdoor neurons are the ones whose small perturbation most easily breaks the model. Every BatchNorm
channel k gets a mask m_k in [0, 1] and multiplicative noise: its scale becomes gamma_k (m_k + d_k) and
its shift beta_k (1 + e_k), with d, e in [-eps, eps]. On clean data, alternately (1) draw the noise
uniformly and take `steps` signed-gradient ascent steps on the loss, and (2) update the masks by SGD
on alpha * L(clean, m) + (1 - alpha) * L(perturbed, m), clipping them to [0, 1]. Channels whose mask
ends low are pruned by zeroing their BatchNorm scale (as the authors' `prune_neuron_cifar.py` does),
by threshold or by count.

Constants from the authors' code (csdongxian/ANP_backdoor, `optimize_mask_cifar.py`): eps 0.4, one
noise step of size eps, alpha 0.2, mask SGD lr 0.2 with momentum 0.9, batch 128, 2000 iterations
sampled with replacement, model in train mode; the paper prunes at threshold 0.2. Unlike that code
we project the noise back onto [-eps, eps] after each ascent step: the paper's perturbation budget.
No pruning depth is chosen on the test set (BackdoorBench picks the lowest test ASR over thresholds).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.func import functional_call

from ..errors import CGDError
from ..harness.augment import random_crop_flip
from ..harness.precision import autocast, resolve_device, use_bf16
from ..harness.trainer import TrainConfig
from ..models import Classifier
from .base import Defense, register_defense
from .clean_source import CleanDataParams, resolve_clean_data


@dataclass
class NeuronPerturbation:
    """Mask and noise of every affine BatchNorm channel of a network, applied through
    `functional_call` so the network's own modules stay untouched."""

    names: list[str]
    layers: list[nn.modules.batchnorm._BatchNorm]
    masks: list[torch.Tensor]
    weight_noise: list[torch.Tensor]
    bias_noise: list[torch.Tensor]

    @classmethod
    def attach(cls, net: nn.Module) -> "NeuronPerturbation":
        named = [(n, m) for n, m in net.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
        if not named:
            raise CGDError(f"defense 'anp' perturbs BatchNorm channels, and {type(net).__name__} has none")
        layers = [m for _, m in named]
        return cls(names=[n for n, _ in named], layers=layers,
                   masks=[torch.ones_like(m.weight, requires_grad=True) for m in layers],
                   weight_noise=[torch.zeros_like(m.weight, requires_grad=True) for m in layers],
                   bias_noise=[torch.zeros_like(m.weight, requires_grad=True) for m in layers])

    @property
    def noise(self) -> list[torch.Tensor]:
        return self.weight_noise + self.bias_noise

    def parameters(self, perturbed: bool) -> dict[str, torch.Tensor]:
        out = {}
        for name, bn, mask, d, e in zip(self.names, self.layers, self.masks, self.weight_noise, self.bias_noise):
            out[f"{name}.weight"] = bn.weight.detach() * (mask + d if perturbed else mask)
            out[f"{name}.bias"] = bn.bias.detach() * (1 + e) if perturbed else bn.bias.detach()
        return out

    @torch.no_grad()
    def randomise_noise(self, eps: float, generator: torch.Generator) -> None:
        for t in self.noise:
            t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1) * eps)

    @torch.no_grad()
    def ascend_noise(self, grads, step: float, eps: float) -> None:
        for t, g in zip(self.noise, grads):
            t.add_(step * g.sign()).clamp_(-eps, eps)

    @torch.no_grad()
    def clip_masks(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, 1.0)

    def mask_values(self) -> torch.Tensor:
        return torch.cat([m.detach().cpu() for m in self.masks])


def optimise_neuron_masks(model: Classifier, images: torch.Tensor, labels: torch.Tensor, *, iterations: int,
                          batch_size: int, lr: float, eps: float, steps: int, alpha: float, recipe: TrainConfig,
                          seed: int = 0, device=None) -> NeuronPerturbation:
    """ANP's mask optimisation on a copy of `model` (whose BatchNorm statistics it changes, being in
    train mode as in the authors' code); returns the learnt masks and the last noise."""
    device = resolve_device(device)
    bf16 = use_bf16(recipe.precision, device)
    probe = copy.deepcopy(model).to(device).train().requires_grad_(False)
    state = NeuronPerturbation.attach(probe.net)
    g = torch.Generator().manual_seed(seed)
    mask_opt = torch.optim.SGD(state.masks, lr=lr, momentum=0.9)

    def loss(x: torch.Tensor, y: torch.Tensor, perturbed: bool) -> torch.Tensor:
        with autocast(bf16, device):
            logits = functional_call(probe.net, state.parameters(perturbed), (probe.normalize(x),))
        return F.cross_entropy(logits.float(), y)

    for _ in range(iterations):
        idx = torch.randint(len(labels), (batch_size,), generator=g)
        x = images[idx].to(device).float().div_(255)
        if recipe.augment:
            x = random_crop_flip(x, recipe.crop_padding, recipe.flip, g)
        y = labels[idx].to(device)
        robust = torch.zeros((), device=device)
        if eps > 0:
            state.randomise_noise(eps, g)
            for _ in range(steps):
                grads = torch.autograd.grad(loss(x, y, True), state.noise)
                state.ascend_noise(grads, eps / steps, eps)
            robust = loss(x, y, True)
        total = alpha * loss(x, y, False) + (1 - alpha) * robust
        mask_opt.zero_grad(set_to_none=True)
        for m, grad in zip(state.masks, torch.autograd.grad(total, state.masks)):
            m.grad = grad
        mask_opt.step()
        state.clip_masks()
    return state


@torch.no_grad()
def prune_neurons(model: Classifier, state: NeuronPerturbation, pruned: torch.Tensor) -> None:
    """Zero the BatchNorm scale of every channel flagged in `pruned` (concatenated over `state`'s layers)."""
    modules = dict(model.net.named_modules())
    start = 0
    for name, mask in zip(state.names, state.masks):
        flags = pruned[start:start + len(mask)]
        modules[name].weight[flags.to(modules[name].weight.device)] = 0
        start += len(mask)


def neurons_to_prune(values: torch.Tensor, *, by: str, threshold: float, count: int | None) -> torch.Tensor:
    if by == "threshold":
        return values <= threshold
    pruned = torch.zeros(len(values), dtype=torch.bool)
    pruned[torch.argsort(values, stable=True)[:count]] = True
    return pruned


@register_defense("anp")
class ANP(Defense):
    threat_model = "clean-subset"

    class Params(CleanDataParams):
        iterations: int = Field(2000, ge=1, description="mask-optimisation iterations (nb_iter)")
        batch_size: int = Field(128, ge=1)
        lr: float = Field(0.2, gt=0, description="mask SGD learning rate")
        eps: float = Field(0.4, ge=0, description="bound of the multiplicative neuron noise")
        steps: int = Field(1, ge=1, description="noise ascent steps per iteration")
        alpha: float = Field(0.2, ge=0, le=1, description="weight of the clean loss against the perturbed loss")
        pruning_by: Literal["threshold", "number"] = "threshold"
        threshold: float = Field(0.2, ge=0, le=1, description="pruning_by=threshold: prune masks <= this")
        count: int | None = Field(None, ge=1, description="pruning_by=number: prune this many lowest masks")

        @model_validator(mode="after")
        def _count_given(self):
            if self.pruning_by == "number" and self.count is None:
                raise ValueError("pruning_by=number needs count (how many neurons to prune)")
            return self

    def fit(self, model, train_set, *, val_set=None, clean_subset=None, context):
        p = self.params
        if clean_subset is not None:
            raise CGDError("defense 'anp' takes its clean data from clean_source (oracle | cgd | random), "
                           "not from clean_subset")
        with context.stage("clean_data"):
            clean = resolve_clean_data(p, train_set, context, self.name, val_set=val_set)

        with context.stage("mask_optimisation"):
            state = optimise_neuron_masks(model, clean.data.images, clean.data.labels, iterations=p.iterations,
                                          batch_size=p.batch_size, lr=p.lr, eps=p.eps, steps=p.steps, alpha=p.alpha,
                                          recipe=context.preset.train, seed=context.seed, device=context.device)

        values = state.mask_values()
        pruned = neurons_to_prune(values, by=p.pruning_by, threshold=p.threshold, count=p.count)
        defended = copy.deepcopy(model)
        prune_neurons(defended, state, pruned)
        per_layer, start = {}, 0
        for name, mask in zip(state.names, state.masks):
            n = int(pruned[start:start + len(mask)].sum())
            if n:
                per_layer[name] = n
            start += len(mask)
        self.model_ = defended.eval()
        self.info_ = {**clean.info, "n_neurons": len(values), "n_pruned": int(pruned.sum()),
                      "pruned_per_layer": per_layer,
                      "mask_quantiles": {f"{q:g}": float(values.quantile(q)) for q in (0.0, 0.01, 0.05, 0.25, 0.5)}}
        return self
