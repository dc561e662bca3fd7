"""Sample-specific invisible backdoor (Li, Li, Wu, Li, He & Lyu, "Invisible Backdoor Attack with
Sample-Specific Triggers", ICCV 2021): a steganographic encoder hides one fixed code in every poisoned
image; the residual it adds depends on the image, so each poisoned image carries its own invisible
trigger; then dirty-label poisoning (10%, all-to-one in BackdoorBench).

The encoder/decoder follow StegaStamp (Tancik, Mildenhall & Ng, CVPR 2020) as in the code
BackdoorBench ships for SSBA (`resource/ssba/models.py`, `train.py`): the code (100 bits) goes through
a dense layer to a small map that is upsampled and concatenated with the image; a U-Net maps both to
the encoded image; a strided-conv decoder reads the bits back. Training: random codes per image,
loss = BCE(bits) + w * MSE(encoded, image), w 0 for the first 1000 steps then ramped linearly to 10
over 3000 steps; Adam 1e-4, batch 64, 20 epochs. At poisoning time every image gets the same code
(drawn with `seed`). Here the U-Net outputs a residual added to the image (their `use_residual`
option), and it is smaller than theirs (three down/up stages of `width` to 4 x `width` channels,
for 32x32 images).

Where the encoder is trained: the original SSBA used an encoder trained on ImageNet; BackdoorBench
trains it on the dataset's own training images. Here it is trained, on this machine, on the clean
images of the attacker's pool (the victim's training pool), at the preset's scale.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ...harness.precision import autocast, resolve_device, use_bf16
from ..triggers import register_trigger
from .fit import LearnedParams, LearnedTrigger, progress


class StegaEncoder(nn.Module):
    """(code bits, image) -> residual. The code becomes a 3-channel map at 1/4 resolution, upsampled
    and stacked with the image; a U-Net with `depth` stride-2 stages and skip connections follows."""

    def __init__(self, bits: int, image_size: int, width: int = 32, depth: int = 3):
        super().__init__()
        self.code_side = image_size // 4
        self.code_dense = nn.Linear(bits, 3 * self.code_side ** 2)
        widths = [width * 2 ** min(d, 2) for d in range(depth + 1)]
        self.stem = nn.Conv2d(6, widths[0], 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(widths[d], widths[d + 1], 3, stride=2, padding=1) for d in range(depth))
        self.up = nn.ModuleList(nn.Conv2d(widths[d + 1], widths[d], 3, padding=1) for d in reversed(range(depth)))
        self.merge = nn.ModuleList(nn.Conv2d(2 * widths[d], widths[d], 3, padding=1) for d in reversed(range(depth)))
        self.head = nn.Sequential(nn.Conv2d(widths[0] + 6, widths[0], 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(widths[0], 3, 1))

    def forward(self, code: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        c = F.relu(self.code_dense(code)).view(-1, 3, self.code_side, self.code_side)
        inputs = torch.cat([F.interpolate(c, size=image.shape[-2:], mode="nearest"), image], dim=1)
        skips = [F.relu(self.stem(inputs))]
        for conv in self.down:
            skips.append(F.relu(conv(skips[-1])))
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            x = F.relu(up(F.interpolate(x, size=skip.shape[-2:], mode="nearest")))
            x = F.relu(merge(torch.cat([skip, x], dim=1)))
        return self.head(torch.cat([x, inputs], dim=1))


class StegaDecoder(nn.Module):
    """Image -> code logits: stride-2 convs down to 2x2, then two dense layers."""

    def __init__(self, bits: int, image_size: int, width: int = 32):
        super().__init__()
        layers, ci, side = [], 3, image_size
        for co in (width, width * 2, width * 2, width * 4):
            if side <= 2:
                break
            layers += [nn.Conv2d(ci, co, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            ci, side = co, (side + 1) // 2
        self.features = nn.Sequential(*layers)
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(ci * side * side, 512), nn.ReLU(inplace=True),
                                   nn.Linear(512, bits))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.dense(self.features(image))


@register_trigger("ssba")
class SSBATrigger(LearnedTrigger):
    """Image + encoder residual hiding a fixed code: one distinct residual per image.
    `test.strength` scales the residual."""

    class Params(LearnedParams):
        bits: int = Field(100, ge=1, le=1024, description="length of the hidden code")
        width: int = Field(32, ge=4, le=256)
        depth: int = Field(3, ge=1, le=5, description="U-Net stages (the image side must divide by 2**depth and 4)")
        epochs: float = Field(20, gt=0)
        batch_size: int = Field(64, ge=1)
        lr: float = Field(1e-4, gt=0)
        l2_weight: float = Field(10.0, ge=0, description="final weight of the image-fidelity MSE")
        l2_await: int = Field(1000, ge=0, description="steps before the MSE is switched on")
        l2_ramp: int = Field(3000, ge=1, description="steps over which its weight grows to l2_weight")
        bce_weight: float = Field(1.0, gt=0)
        max_images: int | None = Field(None, ge=1, description="train on at most this many pool images (seeded)")

    def __init__(self, params, image_size, attack_seed=0):
        super().__init__(params, image_size, attack_seed)
        if image_size % 4 or image_size % (2 ** params.depth):
            raise ValueError(f"ssba: image size {image_size} must be divisible by 4 and 2**depth = {2 ** params.depth}")

    def code(self) -> torch.Tensor:
        """The fixed code hidden in every poisoned image."""
        p = self.scaled
        return torch.randint(0, 2, (1, p.bits), generator=torch.Generator().manual_seed(p.seed)).float()

    def compute_fit(self, context, policy, params):
        device = resolve_device(context.device)
        bf16 = use_bf16(context.preset.train.precision, device)
        torch.manual_seed(params.seed)
        g = torch.Generator().manual_seed(params.seed)
        images = context.train.images
        if params.max_images is not None and params.max_images < len(images):
            images = images[torch.randperm(len(images), generator=g)[:params.max_images]]
        encoder = StegaEncoder(params.bits, self.image_size, params.width, params.depth).to(device)
        decoder = StegaDecoder(params.bits, self.image_size, params.width).to(device)
        opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=params.lr)
        bs = min(params.batch_size, len(images))
        steps_per_epoch = max(1, len(images) // bs)
        total = max(1, int(round(params.epochs * steps_per_epoch)))
        bit_acc = 0.0
        with progress(total, "ssba: encoder + decoder") as bar:
            for step in range(total):
                if step % steps_per_epoch == 0:
                    order = torch.randperm(len(images), generator=g)
                k = step % steps_per_epoch
                x = images[order[k * bs:(k + 1) * bs]].float().div(255).to(device)
                codes = torch.randint(0, 2, (len(x), params.bits), generator=g).float().to(device)
                with autocast(bf16, device):
                    encoded = (x + encoder(codes, x).float()).clamp(0, 1)
                    logits = decoder(encoded).float()
                l2_w = 0.0 if step < params.l2_await else min(1.0, (step - params.l2_await) / params.l2_ramp) * params.l2_weight
                loss = params.bce_weight * F.binary_cross_entropy_with_logits(logits, codes) + \
                    l2_w * F.mse_loss(encoded, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bit_acc = float(((logits > 0).float() == codes).float().mean())
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", bit_acc=f"{bit_acc:.3f}", refresh=False)
        return {"encoder": {k: v.cpu() for k, v in encoder.state_dict().items()},
                "decoder": {k: v.cpu() for k, v in decoder.state_dict().items()}, "bit_accuracy": bit_acc}

    def load_fit(self, state, context, policy):
        self.device = resolve_device(context.device)
        self.bf16 = use_bf16(context.preset.train.precision, self.device)
        self.encoder = StegaEncoder(self.scaled.bits, self.image_size, self.scaled.width, self.scaled.depth)
        self.encoder.load_state_dict(state["encoder"])
        self.encoder.to(self.device).eval()

    @torch.no_grad()
    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        code = self.code().to(self.device)
        for start in range(0, len(x), 512):
            xb = x[start:start + 512].to(self.device)
            with autocast(self.bf16, self.device):
                out[start:start + len(xb)] = self.encoder(code.expand(len(xb), -1), xb).float().to(x)
        return out

    def apply(self, x, indices, train, strength=1.0):
        self.require_fitted()
        return (x + strength * self.residual(x)).clamp(0, 1)
