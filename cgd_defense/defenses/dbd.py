"""`dbd`: Decoupling-Based backdoor Defense (Huang, Li, Wu, Qin & Ren, "Backdoor Defense via
Decoupling the Training Process", ICLR 2022).

End-to-end supervised training is what lets a trigger tie to the target label, so DBD decouples it:
1. a backbone is trained by self-supervised SimCLR on the images alone (labels unused): poisoned
   samples then cluster by content, not by trigger;
2. a linear head is trained on the frozen backbone with the noise-robust symmetric cross-entropy
   (SCE); poisoned samples, whose labels disagree with their content, keep a high loss;
3. the lowest-loss `epsilon` (50%) are "high-credible" and keep their labels, the rest are
   "low-credible" and lose them; the whole model is fine-tuned by semi-supervised MixMatch. The
   authors re-rank the samples before every semi-supervised epoch, and so do we.

Constants (the `paper` preset), from the authors' CIFAR-10 configs (SCLBD/DBD):
- SimCLR (`config/defense/simclr/*/example.yaml`): batch 512, temperature 0.5, SGD lr 0.4, momentum
  0.9, weight decay 1e-4, cosine annealing over 1000 epochs of which the fine-tuning loads epoch 100
  (`pretrain_checkpoint: epoch100.pt`), so 100 epochs run at a nearly flat lr; augmentation
  RandomResizedCrop(scale 0.2-1, bicubic) + flip + ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 +
  grayscale p 0.2 + Gaussian blur (sigma 0.1-2) p 0.5; projection head Linear-BN-ReLU-Linear to 128
  (`model/model.py`).
- Fine-tuning (`config/defense/mixmatch_finetune/*/example.yaml`): 10 warm-up epochs of the head
  with SCE (alpha 0.1, beta 1, batch 128), then 190 MixMatch epochs (see `semisup.py`), epsilon
  0.5, Adam lr 0.002 throughout; BackdoorBench `config/defense/dbd/cifar10.yaml` agrees.

Where we differ, and why:
- NT-Xent uses both views as anchors, as SimCLR and the paper's loss do; the authors' `SimCLRLoss`
  anchors only the first view.
- The batched tensor augmentation applies ColorJitter's four operations in one random order per
  batch (torchvision draws one per image), and zero-pads crops in fine-tuning (theirs reflects).
- Samples are ranked by their SCE loss in eval mode without augmentation (the authors' record pass
  reuses the training transform).
- The final model is the last epoch's; the authors keep the best epoch by *test* accuracy.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..data.datasets import ImageData
from ..harness.cache import tensor_digest
from ..harness.precision import autocast, resolve_device, use_bf16
from ..harness.trainer import TrainConfig, init_from_data_once, make_optimizer, train
from ..models import Classifier
from .base import Defense, Split, register_defense
from .semisup import lowest_fraction, mixmatch_config, split_and_mixmatch, symmetric_cross_entropy

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# SimCLR (Chen et al., ICML 2020) pieces, as DBD configures them


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale: (B, 1, H, W)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.long() % 6
    # (r, g, b) for each of the six hue sectors
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, sector.unsqueeze(1))
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, sector.unsqueeze(1))
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, sector.unsqueeze(1))
    return torch.cat([r, g, b], 1)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def color_jitter(x: torch.Tensor, generator: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1) -> torch.Tensor:
    """torchvision's ColorJitter on a batch in [0, 1], one factor per image, the four operations in
    one random order per batch."""
    n, dev = len(x), x.device
    factors = {"brightness": _uniform(n, 1 - brightness, 1 + brightness, generator, dev).view(n, 1, 1, 1),
               "contrast": _uniform(n, 1 - contrast, 1 + contrast, generator, dev).view(n, 1, 1, 1),
               "saturation": _uniform(n, 1 - saturation, 1 + saturation, generator, dev).view(n, 1, 1, 1),
               "hue": _uniform(n, -hue, hue, generator, dev).view(n, 1, 1)}
    for op in torch.randperm(4, generator=generator).tolist():
        name = ("brightness", "contrast", "saturation", "hue")[op]
        k = factors[name]
        if name == "brightness":
            x = (x * k).clamp(0, 1)
        elif name == "contrast":
            mean = _grayscale(x).mean((1, 2, 3), keepdim=True)
            x = (k * x + (1 - k) * mean).clamp(0, 1)
        elif name == "saturation":
            x = (k * x + (1 - k) * _grayscale(x)).clamp(0, 1)
        else:
            h, s, v = _rgb_to_hsv(x)
            x = _hsv_to_rgb((h + k) % 1.0, s, v)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image `sigma` (B,), reflect padding, radius ceil(3 sigma_max)."""
    n, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), min(h, w) - 1))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator, scale=(0.2, 1.0),
                             ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop(size = input size, bicubic) + RandomHorizontalFlip on a batch, as one affine
    resampling per image (an over-large crop is clamped to the image instead of re-drawn)."""
    n, dev = len(x), x.device
    area = _uniform(n, scale[0], scale[1], generator, "cpu")
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, "cpu"))
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=generator) - 1) * (1 - width)
    cy = (2 * torch.rand(n, generator=generator) - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)


def simclr_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DBD's SimCLR view of a [0, 1] batch (see the module docstring for the constants)."""
    n = len(x)
    x = random_resized_crop_flip(x, generator)
    jitter = (torch.rand(n, generator=generator) < 0.8).to(x.device)
    x = torch.where(jitter.view(n, 1, 1, 1), color_jitter(x, generator), x)
    gray = (torch.rand(n, generator=generator) < 0.2).to(x.device)
    x = torch.where(gray.view(n, 1, 1, 1), _grayscale(x).expand_as(x), x)
    blur = torch.nonzero(torch.rand(n, generator=generator) < 0.5).flatten().to(x.device)
    if len(blur):
        sigma = _uniform(len(blur), 0.1, 2.0, generator, x.device)
        x = x.index_copy(0, blur, gaussian_blur(x[blur], sigma))
    return x.contiguous()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over 2N views: each view's positive is the
    other view of its image, its negatives the other 2N - 2 views."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def projection_head(feature_dim: int, out_dim: int = 128) -> nn.Sequential:
    """DBD's `SelfModel` MLP head (its output is L2-normalised inside `nt_xent`)."""
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(),
                         nn.Linear(feature_dim, out_dim))


def simclr_pretrain(model: Classifier, images: torch.Tensor, *, epochs: float, cosine_epochs: float,
                    batch_size: int, lr: float, momentum: float, weight_decay: float, temperature: float,
                    seed: int, device=None, precision: str = "auto", channels_last: bool = True) -> list[float]:
    """Train `model`'s feature extractor (`forward_features`) with SimCLR on `images`, labels unused.
    Returns the mean loss of each epoch.

    A loop of its own: each step feeds two augmented views of one batch through the backbone and a
    projection head that is thrown away afterwards, which the trainer's `(logits, batch)` loop
    cannot express. It reuses the trainer's optimizer factory and precision policy."""
    if len(images) < 2:
        raise ValueError(f"SimCLR needs at least two images (each view's negatives), got {len(images)}")
    device = resolve_device(device)
    bf16 = use_bf16(precision, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    head = projection_head(model.classifier.in_features)
    init_from_data_once(model, images, torch.arange(len(images)), seed)
    model.to(device=device, memory_format=memory_format).train()
    head.to(device).train()
    opt_cfg = TrainConfig(optimizer="sgd", lr=lr, momentum=momentum, nesterov=False, weight_decay=weight_decay)
    optimizer = make_optimizer(nn.ModuleList([model, head]), opt_cfg)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total_steps = max(1, int(round(epochs * steps_per_epoch)))
    history, step = [], 0
    while step < total_steps:
        order = torch.randperm(len(images), generator=gen)
        loss_sum, n_batches = 0.0, 0
        for start in range(0, len(images), batch_size):
            if step >= total_steps:
                break
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # a lone image has no negatives
                continue
            # the authors step a cosine schedule of `cosine_epochs` once per epoch; we step it per batch
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(step / steps_per_epoch / cosine_epochs, 1.0)))
            x = images[idx].to(device).float().div_(255)
            views = torch.cat([simclr_augment(x, gen), simclr_augment(x, gen)]).contiguous(memory_format=memory_format)
            with autocast(bf16, device):
                z = head(model.forward_features(views).float())
            loss = nt_xent(z[:len(idx)], z[len(idx):], temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
            n_batches += 1
            step += 1
        history.append(loss_sum / max(n_batches, 1))
        log.info("simclr: epoch %d/%d, loss %.4f", len(history), math.ceil(total_steps / steps_per_epoch),
                 history[-1])
    model.eval()
    return history


def pretrain_backbone(net: Classifier, images: torch.Tensor, p, *, preset, seed: int, cache, device=None) -> list[float]:
    """DBD's stage 1: SimCLR on `images` with `p`'s `simclr_*` settings and `temperature`, into
    `net` in place; cached by (images, architecture, seed, precision, settings). Returns the loss of
    each SimCLR epoch."""
    precision = preset.train.precision
    simclr_params = {k: v for k, v in p.model_dump().items() if k.startswith("simclr") or k == "temperature"}
    spec = {"images": tensor_digest(images), "model": preset.model, "seed": seed, "precision": precision,
            "params": simclr_params}

    def pretrain():
        history = simclr_pretrain(
            net, images, epochs=p.simclr_epochs, cosine_epochs=p.simclr_cosine_epochs,
            batch_size=p.simclr_batch_size, lr=p.simclr_lr, momentum=p.simclr_momentum,
            weight_decay=p.simclr_weight_decay, temperature=p.temperature, seed=seed, device=device,
            precision=precision, channels_last=preset.train.channels_last)
        return {"state_dict": {k: v.cpu() for k, v in net.net.state_dict().items()}, "history": history}

    pretrained = cache.get_or_compute("dbd-simclr", spec, pretrain)
    net.net.load_state_dict(pretrained["state_dict"])
    return pretrained["history"]


def warm_up_head(net: Classifier, images: torch.Tensor, labels: torch.Tensor, p, optimizer, *, preset, seed: int,
                 device=None) -> None:
    """DBD's stage 2: `net`'s linear head trained with SCE (`p.sce_alpha`, `p.sce_beta`) on the
    frozen backbone for `p.warmup_epochs`, with `optimizer` (DBD's one Adam)."""
    head = set(map(id, net.classifier.parameters()))
    frozen = [q for q in net.parameters() if id(q) not in head]
    for q in frozen:
        q.requires_grad_(False)
    cfg = TrainConfig(epochs=p.warmup_epochs, batch_size=p.warmup_batch_size, optimizer="adam", lr=p.lr,
                      weight_decay=0.0, schedule="constant", label_smoothing=0.0, crop_padding=4,
                      precision=preset.train.precision, channels_last=preset.train.channels_last)
    try:
        train(net, images, labels, cfg, seed=seed, optimizer=optimizer, device=device,
              loss_fn=lambda logits, b: symmetric_cross_entropy(logits, b.y, alpha=p.sce_alpha,
                                                               beta=p.sce_beta).mean(),
              desc="dbd: linear head on the frozen SimCLR backbone")
    finally:
        for q in frozen:
            q.requires_grad_(True)


# ---------------------------------------------------------------------------------------------


@register_defense("dbd")
class DBD(Defense):
    threat_model = "poisoned-data"

    class Params(Defense.Params):
        simclr_epochs: float = Field(100, gt=0, description="SimCLR epochs run (the authors load epoch 100)")
        simclr_cosine_epochs: float = Field(1000, gt=0, description="length of SimCLR's cosine lr schedule")
        simclr_batch_size: int = Field(512, ge=2)
        simclr_lr: float = Field(0.4, gt=0)
        simclr_momentum: float = Field(0.9, ge=0, lt=1)
        simclr_weight_decay: float = Field(1e-4, ge=0)
        temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
        warmup_epochs: float = Field(10, gt=0, description="epochs of the linear head on the frozen backbone")
        warmup_batch_size: int = Field(128, ge=1)
        sce_alpha: float = Field(0.1, ge=0)
        sce_beta: float = Field(1.0, ge=0)
        epsilon: float = Field(0.5, gt=0, lt=1, description="share of lowest-SCE-loss samples kept labelled")
        semi_epochs: int = Field(190, ge=1, description="MixMatch epochs, each re-ranking the samples first")
        semi_iterations: int = Field(1024, ge=1, description="MixMatch steps per epoch")
        semi_batch_size: int = Field(64, ge=1)
        lr: float = Field(0.002, gt=0, description="Adam lr of warm-up and MixMatch")
        mixmatch_temperature: float = Field(0.5, gt=0)
        mixmatch_alpha: float = Field(0.75, gt=0)
        lambda_u: float = Field(15.0, ge=0)
        rampup_epochs: float = Field(190, ge=0, description="lambda_u ramp-up length in epochs")
        # The authors count the 10 warm-up epochs into the ramp (lambda_u starts MixMatch at 10/190 of its
        # value). Shortened presets keep the full warm-up, so counting it would start their ramp half-way.
        rampup_counts_warmup: bool = Field(True, description="count the warm-up epochs into the ramp-up")

    def stage_work(self, n_train: int) -> dict[str, float]:
        p = self.params
        return {"simclr": p.simclr_epochs * n_train, "linear_warmup": p.warmup_epochs * n_train,
                "split": p.semi_epochs * n_train,  # one loss pass over the data before each MixMatch epoch
                "mixmatch": p.semi_epochs * p.semi_iterations * p.semi_batch_size}

    def fit(self, model, train_set: ImageData, *, val_set=None, clean_subset=None, context) -> "DBD":
        """Train a fresh model of `model`'s architecture on `train_set` (DBD trains from scratch; the
        backdoored `model` itself is not used)."""
        from ..harness.pipeline import build_model  # deferred: the pipeline imports this package

        p = self.params
        images, labels = train_set.images, train_set.labels
        precision = context.preset.train.precision
        torch.manual_seed(context.seed)
        net = build_model(context.preset, context.dataset, len(context.classes))

        with context.stage("simclr"):
            history = pretrain_backbone(net, images, p, preset=context.preset, seed=context.seed,
                                        cache=context.cache, device=context.device)
        # One Adam over the whole model for warm-up and MixMatch, as the authors' single optimizer.
        optimizer = make_optimizer(net, TrainConfig(optimizer="adam", lr=p.lr, weight_decay=0.0))
        with context.stage("linear_warmup"):
            warm_up_head(net, images, labels, p, optimizer, preset=context.preset, seed=context.seed,
                         device=context.device)

        trace, credible, losses = split_and_mixmatch(
            net, images, labels, optimizer, mixmatch_config(p, context.preset.train), epochs=p.semi_epochs,
            choose_pool=lambda epoch, losses: (lowest_fraction(losses, p.epsilon), losses, {}),
            sce_alpha=p.sce_alpha, sce_beta=p.sce_beta, num_classes=len(context.classes), seed=context.seed,
            stage=context.stage, report=context.report_poison_rate,
            first_epoch=math.ceil(p.warmup_epochs) if p.rampup_counts_warmup else 0,
            val=(val_set.images, val_set.labels) if val_set is not None else None,
            device=context.device, precision=precision)

        self.model_ = net.eval()
        self.split_ = Split(clean=credible, suspect=~credible, scores={"sce_loss": losses},
                            info={"rule": f"lowest {p.epsilon:.0%} SCE loss = high-credible (last MixMatch epoch)"})
        self.info_ = {"simclr_loss": history, "mixmatch_epochs": trace}
        return self
