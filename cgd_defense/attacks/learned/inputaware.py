"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020).

Every image gets its own trigger: a generator G makes a pattern from the image, a mask network M
makes a sparse mask from it, and x' = x + (G(x) - x) * M(x). The trigger must be specific to its
image: the diversity loss ||x1 - x2|| / ||G(x1) - G(x2)|| keeps different images' patterns apart, and
"cross-trigger" samples (x1 with the pattern and mask of another image x2) keep their true label.

The authors' schedule (BackdoorBench `attack/inputaware.py`, `config/attack/inputaware/default.yaml`):
1. M alone for 25 epochs: lambda_norm 100 * mean(relu(mask - 0.032)) + lambda_div 1 * diversity of
   the masks (Adam 0.01, betas (0.5, 0.9), lr x0.1 at epochs 10 and 20); then M is frozen;
2. G and a classifier C together for 100 epochs: in each batch of 128, pratio x 128 images get their
   own trigger and the target label, as many are cross samples, the rest stay clean; loss =
   cross-entropy + lambda_div * diversity of the patterns (C: SGD 0.01, momentum 0.9, wd 5e-4; G: Adam
   0.01, betas (0.5, 0.9)).
Both networks are the authors' encoder-decoder (3 stages of two conv-BN-ReLU and a max-pool, widths
32-64-128, mirrored with bilinear upsampling; tanh output mapped to [0, 1]), and the mask is
sharpened by tanh(20 m - 10) / 2 + 1/2. Blending in [0, 1] pixels equals their blending in
normalised pixels, normalisation being affine per channel.

The fit returns G and M; the poisoned training set is materialised from them (poisoned images: their
own trigger, target label; cross images, `poisoning.cross_ratio` x as many: a trigger made from a
seeded partner image of the attacker's pool, true label), so poisoned-data defenses see what a victim
trains on. The victim is then trained by the harness on that set, like every other attack's victim;
the authors instead report their jointly trained C.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ...harness.augment import random_crop_flip
from ...harness.precision import autocast, resolve_device, use_bf16
from ..triggers import register_trigger
from .fit import LearnedParams, LearnedTrigger, channel_stats, make_classifier, progress

EPSILON = 1e-7  # the authors' EPSILON in the diversity ratio


def _conv_bn(ci: int, co: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(ci, co, 3, padding=1), nn.BatchNorm2d(co, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class EncoderDecoder(nn.Sequential):
    """Image -> (out_channels, H, W) map in [0, 1]: `depth` stages down (two conv-BN-ReLU, max-pool,
    width doubling from `width`), one in the middle, `depth` stages up (bilinear x2, conv-BN-ReLU,
    conv-BN halving the width; the last conv has `out_channels` and no ReLU), then tanh/2 + 1/2."""

    def __init__(self, out_channels: int, width: int = 32, depth: int = 3):
        layers: list[nn.Module] = []
        ci, c = 3, width
        for d in range(depth):
            layers += [_conv_bn(ci, c), _conv_bn(c, c), nn.MaxPool2d(2)]
            ci = c
            if d < depth - 1:
                c *= 2
        layers.append(_conv_bn(c, c))
        for d in range(depth):
            last = d == depth - 1
            co = out_channels if last else c // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _conv_bn(c, c),
                       _conv_bn(c, co, relu=not last)]
            c = co
        super().__init__(*layers)

    def forward(self, x):
        return torch.tanh(super().forward(x)) / (2 + EPSILON) + 0.5


def sharpen(mask: torch.Tensor) -> torch.Tensor:
    """The authors' near-binary threshold of the mask network's output."""
    return torch.tanh(mask * 20 - 10) / (2 + EPSILON) + 0.5


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches) -> None:
    """Replace the BatchNorm running statistics by their exact averages over `batches` (images in
    [0, 1]) under the final weights. With BN momentum 0.05 the running averages trail the weights for
    ~60 steps, which matters when a preset trains for only a few hundred; at the authors' 25 x 390 steps
    this changes next to nothing."""
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for x in batches:
        net(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    net.eval()


def diversity(a: torch.Tensor, b: torch.Tensor, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
    """mean over pairs of RMS(a - b) / RMS(out_a - out_b): small when different inputs give different outputs."""
    d_in = (a - b).pow(2).mean(dim=(1, 2, 3)).sqrt()
    d_out = (out_a - out_b).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return (d_in / (d_out + EPSILON)).mean()


@register_trigger("input-aware")
class InputAwareTrigger(LearnedTrigger):
    """A per-image trigger from a trained generator and mask network (IAD). `test.strength` scales the
    mask (1: as trained)."""

    class Params(LearnedParams):
        width: int = Field(32, ge=4, le=256, description="generator/mask network's first-stage width")
        depth: int = Field(3, ge=1, le=5, description="down/up stages (the image side must divide by 2**depth)")
        mask_density: float = Field(0.032, gt=0, lt=1)
        lambda_div: float = Field(1.0, ge=0)
        lambda_norm: float = Field(100.0, ge=0)
        mask_epochs: float = Field(25, ge=0, description="mask pre-training epochs (clean_train_epochs)")
        mask_milestones: list[float] = Field([0.4, 0.8], description="fractions of mask_epochs after which the mask "
                                                                  "lr drops x0.1 (the authors' epochs 10 and 20 of 25)")
        epochs: float = Field(100, gt=0, description="joint generator + classifier epochs")
        batch_size: int = Field(128, ge=2)
        lr_generator: float = Field(0.01, gt=0)
        lr_mask: float = Field(0.01, gt=0)
        lr_classifier: float = Field(0.01, gt=0)
        classifier: str | None = Field(None, description="classifier trained with G; default: the preset's victim model")
        max_images: int | None = Field(None, ge=2, description="fit on at most this many images of the pool (seeded)")

    def __init__(self, params, image_size, attack_seed=0, cross: bool = False):
        super().__init__(params, image_size, attack_seed)
        if image_size % (2 ** params.depth):
            raise ValueError(f"input-aware: image size {image_size} must be divisible by 2**depth = {2 ** params.depth}")
        self.cross = cross

    def fit_inputs(self, context, policy):
        return {**super().fit_inputs(context, policy), "classifier": self.scaled.classifier or context.preset.model,
                "label_mode": policy.label_mode, "label_shift": policy.label_shift,
                "ratio": policy.ratio, "cross_ratio": policy.cross_ratio,
                "crop_padding": context.preset.train.crop_padding}

    def _backdoor_labels(self, y: torch.Tensor, policy, num_classes: int) -> torch.Tensor:
        if policy.label_mode == "all-to-all":
            return (y + policy.label_shift) % num_classes
        return torch.full_like(y, policy.target)

    def compute_fit(self, context, policy, params):
        device = resolve_device(context.device)
        bf16 = use_bf16(context.preset.train.precision, device)
        torch.manual_seed(params.seed)
        g = torch.Generator().manual_seed(params.seed)
        data = context.train
        if params.max_images is not None and params.max_images < len(data):
            data = data.subset(torch.randperm(len(data), generator=g)[:params.max_images])
        n, bs, crop = len(data), min(params.batch_size, len(data)), context.preset.train.crop_padding
        steps_per_epoch = n // bs
        generator = EncoderDecoder(3, params.width, params.depth).to(device)
        mask_net = EncoderDecoder(1, params.width, params.depth).to(device)
        classifier = make_classifier(params.classifier or context.preset.model, data.num_classes,
                                     *channel_stats(data.images)).to(device)

        def batches(epochs: float, desc: str):
            """(x1, y1, x2): two independently shuffled, augmented batches, as the authors' two loaders."""
            total = max(1, int(round(epochs * steps_per_epoch)))
            with progress(total, desc) as bar:
                for step in range(total):
                    if step % steps_per_epoch == 0:
                        order1, order2 = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
                    k = step % steps_per_epoch
                    i1, i2 = order1[k * bs:(k + 1) * bs], order2[k * bs:(k + 1) * bs]
                    x1 = random_crop_flip(data.images[i1].float().div(255), crop, True, g).to(device)
                    x2 = random_crop_flip(data.images[i2].float().div(255), crop, True, g).to(device)
                    yield step, x1, data.labels[i1].to(device), x2, bar

        def calibration_batches(limit: int = 50):
            """Up to `limit` batches of un-augmented pool images, in order."""
            for start in range(0, min(n, limit * bs), bs):
                yield data.images[start:start + bs].float().div(255).to(device)

        if params.mask_epochs > 0:
            opt_m = torch.optim.Adam(mask_net.parameters(), params.lr_mask, betas=(0.5, 0.9))
            drops = [int(m * params.mask_epochs * steps_per_epoch) for m in params.mask_milestones]
            sched_m = torch.optim.lr_scheduler.LambdaLR(opt_m, lambda s: 0.1 ** sum(s >= d for d in drops))
            mask_net.train()
            for _, x1, _, x2, bar in batches(params.mask_epochs, "input-aware: mask network"):
                with autocast(bf16, device):
                    m1, m2 = sharpen(mask_net(x1)).float(), sharpen(mask_net(x2)).float()
                loss_norm = F.relu(m1 - params.mask_density).mean()
                loss = params.lambda_norm * loss_norm + params.lambda_div * diversity(x1, x2, m1, m2)
                opt_m.zero_grad(set_to_none=True)
                loss.backward()
                opt_m.step()
                sched_m.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", density=f"{float(m1.detach().mean()):.3f}", refresh=False)
        recalibrate_batchnorm(mask_net, calibration_batches())
        mask_net.requires_grad_(False)

        opt_c = torch.optim.SGD(classifier.parameters(), params.lr_classifier, momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(generator.parameters(), params.lr_generator, betas=(0.5, 0.9))
        generator.train()
        classifier.train()
        correct_bd = n_bd_total = 0
        for _, x1, y1, x2, bar in batches(params.epochs, "input-aware: generator + classifier"):
            # pratio x batch backdoor samples (a fractional expectation for small ratios), as many x cross_ratio cross
            n_bd = min(bs // 3, int(policy.ratio * bs + float(torch.rand(1, generator=g))))
            n_cross = min(bs - 2 * n_bd, int(round(policy.cross_ratio * n_bd)))
            inputs, loss_div = x1, 0.0
            with autocast(bf16, device):
                if n_bd:
                    # x2's images right after the backdoor slots lend their triggers to the cross samples
                    partners = x2[n_bd:n_bd + max(n_bd, n_cross)]
                    patterns1, patterns2 = generator(x1[:n_bd]).float(), generator(partners).float()
                    with torch.no_grad():
                        masks1 = sharpen(mask_net(x1[:n_bd])).float()
                        masks2 = sharpen(mask_net(partners[:n_cross])).float()
                    bd = x1[:n_bd] + (patterns1 - x1[:n_bd]) * masks1
                    cross = x1[n_bd:n_bd + n_cross] + (patterns2[:n_cross] - x1[n_bd:n_bd + n_cross]) * masks2
                    inputs = torch.cat([bd, cross, x1[n_bd + n_cross:]])
                    loss_div = diversity(x1[:n_bd], partners[:n_bd], patterns1, patterns2[:n_bd])
                logits = classifier(inputs).float()
            targets = torch.cat([self._backdoor_labels(y1[:n_bd], policy, data.num_classes), y1[n_bd:]])
            loss = F.cross_entropy(logits, targets) + params.lambda_div * loss_div
            opt_c.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            opt_g.step()
            correct_bd += int((logits[:n_bd].argmax(1) == targets[:n_bd]).sum())
            n_bd_total += n_bd
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", train_asr=f"{correct_bd / max(n_bd_total, 1):.3f}", refresh=False)
        recalibrate_batchnorm(generator, calibration_batches())
        return {"generator": {k: v.cpu() for k, v in generator.state_dict().items()},
                "mask": {k: v.cpu() for k, v in mask_net.state_dict().items()},
                "train_asr": correct_bd / max(n_bd_total, 1)}

    def load_fit(self, state, context, policy):
        self.device = resolve_device(context.device)
        self.bf16 = use_bf16(context.preset.train.precision, self.device)
        self.generator = EncoderDecoder(3, self.scaled.width, self.scaled.depth)
        self.generator.load_state_dict(state["generator"])
        self.mask_net = EncoderDecoder(1, self.scaled.width, self.scaled.depth)
        self.mask_net.load_state_dict(state["mask"])
        self.generator.to(self.device).eval()
        self.mask_net.to(self.device).eval()
        self.partners = context.train.images  # cross samples borrow the trigger of a pool image

    def cross_variant(self) -> "InputAwareTrigger":
        """The component for cross samples: each image gets the trigger made from a partner image,
        drawn from the attacker's pool by a generator seeded with (seed, image index); true label kept."""
        self.require_fitted()
        other = InputAwareTrigger(self.params, self.image_size, self.attack_seed, cross=True)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("cross",)})
        return other

    def _partner_images(self, indices: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in indices.tolist():
            gen = torch.Generator().manual_seed(self.scaled.seed * 1_000_003 + i)
            rows.append(int(torch.randint(len(self.partners), (1,), generator=gen)))
        return self.partners[torch.tensor(rows, dtype=torch.long)].float().div(255)

    @torch.no_grad()
    def apply(self, x, indices, train, strength=1.0):
        self.require_fitted()
        source = self._partner_images(indices).to(x) if self.cross else x
        out = torch.empty_like(x)
        for start in range(0, len(x), 512):
            xb, sb = x[start:start + 512].to(self.device), source[start:start + 512].to(self.device)
            with autocast(self.bf16, self.device):
                pattern = self.generator(sb).float()
                mask = sharpen(self.mask_net(sb)).float()
            out[start:start + len(xb)] = (xb + (pattern - xb) * (mask * strength).clamp(max=1)).to(x)
        return out
