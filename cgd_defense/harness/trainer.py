"""The one trainer. Every stage that trains (backdoored model, suspicious model, every defense's
fine-tuning) calls `train`, so speed work, seeding and precision policy live in one place.

- Data are uint8 tensors in memory; batches are drawn from an index pool (duplicates allowed, which
  is how class-balanced oversampling is expressed) and augmented on the whole batch at once.
- A custom `loss_fn(logits, batch) -> loss` lets defenses mix objectives (CGD: CE on clean samples,
  distillation + unlearning on suspects) while reusing the loop; `batch.idx` indexes the dataset.
- `track_loss=True` records every sample's training loss each epoch (ABL, ASD need it).
- `on_epoch_end(epoch, model) -> bool` may stop training early; callers must base that decision on
  a validation split carved from the training data, never on the test set.
- A model that still needs its data-dependent initialisation (`needs_data_init`, e.g. a whitening
  stem) gets it from the training pool before the first step.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer
from tqdm.auto import tqdm

from ..config import StrictModel
from .augment import random_crop_flip
from .precision import autocast, keep_freed_memory, resolve_device, use_bf16

log = logging.getLogger(__name__)


class TrainConfig(StrictModel):
    epochs: float = Field(10, gt=0, description="may be fractional: stops after that share of the last epoch")
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant", "multistep"] = "onecycle"
    warmup: float = Field(0.2, ge=0, lt=1, description="fraction of steps of linear warm-up (onecycle)")
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="multistep: fractions of training")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = True
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    max_iters_per_epoch: int | None = Field(None, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    # The fast-schedule options of airbench94 (Jordan, 2024), used by the `cpu` preset.
    warmup_start: float = Field(0.0, ge=0, le=1, description="onecycle: learning-rate factor at step 0")
    bias_lr_scale: float = Field(1.0, gt=0, description="learning-rate factor of 1-D parameters (norm shifts, biases)")
    bias_weight_decay: float = Field(0.0, ge=0, description="weight decay of 1-D parameters")
    lookahead: bool = Field(False, description="every 5 steps: slow copy <- moving average with the weights "
                                               "(rate 0.95^5 x progress^3), then weights <- slow copy")
    pad_mode: Literal["zeros", "reflect"] = "zeros"
    flip: bool | Literal["alternating"] = Field(True, description="alternating: each image flipped on every "
                                                                 "other epoch, from a random first choice")

    @model_serializer(mode="wrap")
    def _omit_unset_extensions(self, handler: SerializerFunctionWrapHandler) -> dict:
        # Cache keys and grid job keys hash this dump. Options added after results were recorded are
        # left out while at their defaults, so every recipe that existed before keeps its key.
        data = handler(self)
        for name in _KEY_STABLE_OPTIONS:
            if name in data and data[name] == TrainConfig.model_fields[name].default:
                del data[name]
        return data


_KEY_STABLE_OPTIONS = ("warmup_start", "bias_lr_scale", "bias_weight_decay", "lookahead", "pad_mode")


@dataclass
class Batch:
    x: torch.Tensor  # normalised-by-model float images, augmented
    y: torch.Tensor
    idx: torch.Tensor  # indices into the training tensors


@dataclass
class TrainResult:
    epochs_run: int
    steps: int
    history: list[dict] = field(default_factory=list)
    sample_losses: torch.Tensor | None = None  # (epochs, N), NaN where a sample was not drawn


def progress_enabled() -> bool:
    return os.environ.get("CGD_PROGRESS", "1") != "0"


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warm = max(1, int(cfg.warmup * total_steps))
    if cfg.schedule == "onecycle":
        def f(step):
            if step < warm:
                return cfg.warmup_start + (1 - cfg.warmup_start) * (step + 1) / warm
            return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    elif cfg.schedule == "cosine":
        def f(step):
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    elif cfg.schedule == "multistep":
        marks = [int(m * total_steps) for m in cfg.milestones]
        def f(step):
            return 0.1 ** sum(step >= m for m in marks)
    else:
        def f(step):
            return 1.0
    return f


def init_from_data_once(model: nn.Module, images: torch.Tensor, pool: torch.Tensor, seed: int) -> None:
    """Run `model`'s data-dependent initialisation (FastNet's whitening stem) from up to 5,000
    images of `pool`, unless it has run already. Every training loop calls this before its first
    step: a loop that skipped it would train the layers above a random, frozen stem, and the next
    `train` call would then swap the stem under those trained layers."""
    if getattr(model, "needs_data_init", False):
        # Its own generator: the batch order of every recipe stays what it was before this hook.
        sample = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:5000]]
        model.init_from_data(images[sample.to(images.device)])


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on conv/linear weights only: decaying BatchNorm scales and biases hurts short schedules.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": cfg.bias_weight_decay, "lr": cfg.lr * cfg.bias_lr_scale}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, *,
          seed: int = 0, indices: torch.Tensor | None = None,
          loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None,
          track_loss: bool = False, on_epoch_end: Callable[[int, nn.Module], bool] | None = None,
          device: str | torch.device | None = None, desc: str = "train",
          optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """Train `model` (a `Classifier`, taking [0, 1] images) in place on `images[indices]`."""
    device = resolve_device(device)
    if device.type == "cpu":
        keep_freed_memory()
    bf16 = use_bf16(cfg.precision, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    if device.type != "cpu":
        # One copy of the uint8 data on the accelerator (150 MB for CIFAR-10) instead of a host-to-device
        # copy per batch; batch statistics stay on the device and are read once per epoch, because a
        # read every step makes the host wait for the GPU.
        images, labels = images.to(device), labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if len(pool) == 0:
        raise ValueError(f"{desc}: nothing to train on (empty index pool)")
    steps_per_epoch = math.ceil(len(pool) / cfg.batch_size)
    if cfg.max_iters_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_iters_per_epoch)
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    init_from_data_once(model, images, pool, seed)
    opt = optimizer or make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps))
    sample_losses = torch.full((n_epochs, len(labels)), float("nan")) if track_loss else None
    result = TrainResult(epochs_run=0, steps=0, sample_losses=sample_losses)
    slow_weights = _float_state(model) if cfg.lookahead else None
    flip_first = (torch.rand(len(labels), generator=gen) < 0.5).to(device) if cfg.flip == "alternating" else None
    bar = tqdm(total=total_steps, desc=desc, disable=not progress_enabled(), leave=False, dynamic_ncols=True,
               mininterval=1.0)
    step = 0
    for epoch in range(n_epochs):
        order = pool[torch.randperm(len(pool), generator=gen)]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        epoch_losses = torch.full((len(labels),), float("nan"), device=device) if track_loss else None
        for it in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[it * cfg.batch_size:(it + 1) * cfg.batch_size]
            if len(idx) == 0:
                break
            idx_on_device = idx.to(device)
            x = images[idx_on_device].float().div_(255)
            if cfg.augment:
                flip_mask = None if flip_first is None else flip_first[idx_on_device] ^ bool(epoch % 2)
                x = random_crop_flip(x, cfg.crop_padding, cfg.flip is True, gen, pad_mode=cfg.pad_mode,
                                     flip_mask=flip_mask)
            x = x.contiguous(memory_format=memory_format)
            y = labels[idx_on_device]
            with autocast(bf16, device):
                logits = model(x)
            logits = logits.float()
            if loss_fn is None:
                per_sample = F.cross_entropy(logits, y, reduction="none", label_smoothing=cfg.label_smoothing)
                loss = per_sample.mean()
            else:
                loss = loss_fn(logits, Batch(x, y, idx))
                per_sample = F.cross_entropy(logits.detach(), y, reduction="none") if track_loss else None
            if track_loss:
                epoch_losses[idx_on_device] = per_sample.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if slow_weights is not None and step % 5 == 0:
                _lookahead(model, slow_weights, rate=0.95 ** 5 * (step / total_steps) ** 3)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            seen += len(idx)
            bar.update(1)
            if it % 10 == 0 and not bar.disable:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss_sum) / seen:.3f}",
                                acc=f"{int(correct) / seen:.3f}")
        if track_loss:
            sample_losses[epoch] = epoch_losses.cpu()
        result.history.append({"epoch": epoch + 1, "loss": float(loss_sum) / max(seen, 1),
                               "train_acc": int(correct) / max(seen, 1)})
        log.info("%s: epoch %d/%d, loss %.4f, train acc %.3f", desc, epoch + 1, n_epochs,
                 result.history[-1]["loss"], result.history[-1]["train_acc"])
        result.epochs_run = epoch + 1
        result.steps = step
        if on_epoch_end is not None and on_epoch_end(epoch + 1, model):
            break
        model.train()
    bar.close()
    model.eval()
    return result


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def _lookahead(model: nn.Module, slow: dict[str, torch.Tensor], rate: float) -> None:
    """slow <- rate * slow + (1 - rate) * fast, then fast <- slow (BatchNorm statistics included)."""
    for name, fast in model.state_dict().items():
        if name in slow:
            slow[name].lerp_(fast, 1 - rate)
            fast.copy_(slow[name])


def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 1024, device=None,
            precision: str = "auto", channels_last: bool = True, features: bool = False) -> torch.Tensor:
    """Logits (or penultimate features) for uint8 or [0, 1] images, in fp32 on the CPU."""
    device = resolve_device(device)
    bf16 = use_bf16(precision, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # Moved outside inference mode: weights copied to another device or layout inside it become
    # inference tensors, which a later training step of the same model cannot update.
    model.to(device=device, memory_format=memory_format).eval()
    outs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            x = (x.float().div_(255) if x.dtype == torch.uint8 else x.float()).contiguous(memory_format=memory_format)
            with autocast(bf16, device):
                out = model.forward_features(x) if features else model(x)
            outs.append(out.float().cpu())
    if not outs:
        return torch.empty(0)
    return torch.cat(outs)
