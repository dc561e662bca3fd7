"""Stand-in CLIPs: CLIPs this project trains itself on public data, for machines with no pretrained
weights. Every figure obtained with one is labelled "stand-in CLIP" (`ClipModel.source`).

- Public pool: the seeded, stratified 20% "public split" of the dataset's training set, exactly the
  indices the harness holds out of the victim's data when the CLIP is a stand-in
  (`RunConfig.holds_out_public()`), so the victim never trains on an image the stand-in saw.
  Optionally widened with Tiny-ImageNet-200 (its own 200 classes and captions; ImageNet photos,
  disjoint from CIFAR's images).
- Captions: templates x class names, one randomly drawn template per class at every step (the
  reference template plus CLIP's 80 ImageNet prompts, Radford et al. 2021).
- Loss: CLIP's symmetric contrastive loss (open_clip `ClipLoss`: image->text and text->image
  cross-entropy at the learned temperature) where the text side of a batch is one caption per class,
  and every image whose caption is that class's is a positive (UniCL, Yang et al., CVPR 2022): with
  10 classes a batch holds many images of a class, and open_clip's one-positive targets would push
  same-class pairs apart.
- Variants: `weak-N` trains on N public images per class (a seeded stratified subset), the
  weak-CLIP ablation's axis; `backdoored-ATTACK` trains on the pool poisoned by a registered attack
  (its own trigger, ratio and target), triggered images captioned with the target class: the
  poisoning of contrastive pre-training of Carlini & Terzis (ICLR 2022).
- Training goes through the one trainer (`harness.trainer.train`) with a custom loss, and the
  result is cached under a content hash of the pool, the variant, the recipe and the architecture.
"""
from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..config import StrictModel
from ..data.datasets import ImageData, get_dataset_info, load_split
from ..data.splits import stratified_holdout
from ..errors import CGDError
from ..harness.cache import Cache, atomic_write_bytes, spec_hash, tensor_digest
from ..harness.trainer import Batch, TrainConfig, train
from ..models.wrapper import normalize_images
from .classnames import OPENAI_IMAGENET_TEMPLATES, REFERENCE_TEMPLATES, _GTSRB_ENSEMBLE
from .factory import ClipSpec, parse_clip_spec
from .model import StandinCLIP, create_standin_model, get_model_config, standin_tokenizer

PUBLIC_FRACTION = 0.2  # the presets' public_fraction: the share of the training set held out for the stand-in
STANDIN_FORMAT = 1


class StandinRecipe(StrictModel):
    """How a stand-in is trained: architecture, schedule (the one trainer's TrainConfig), seed."""

    arch: str = "cgd-standin"
    # Adam, as CLIP is trained (Radford et al. 2021): with SGD the text tower never separates the class
    # captions (they differ by one token, so their initial embeddings nearly coincide) and the loss stalls.
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        epochs=40, batch_size=256, optimizer="adam", lr=2e-3, crop_padding=4, warmup=0.1))
    min_steps: int = Field(60, ge=1, description="small pools train for at least this many steps")
    seed: int = 0


SMALL_POOL = 5000  # pools below this size (cifar10-mini's 1,000 public images, weak-N subsets) get the small recipe


def recipe_for(n_pool: int) -> StandinRecipe:
    """The full recipe for full public splits (CIFAR-10: 10,000 images); for small pools a narrower
    tower and a shorter schedule, so smoke tests and CI train their stand-in in seconds."""
    if n_pool >= SMALL_POOL:
        return StandinRecipe()
    return StandinRecipe(arch="cgd-standin-small", train=TrainConfig(
        epochs=30, batch_size=256, optimizer="adam", lr=2e-3, crop_padding=4, warmup=0.1))


# The fingerprint of the recipe every result recorded before fingerprints entered keys was made
# with. Keys leave it out, so those results keep their keys; any other recipe enters the key. Never
# update it: a new recipe must re-key.
RECORDED_RECIPE_FINGERPRINT = "fcabbee445fbcb69e00acfa4ffb4fd7fa83ddc39cc350c951d02a229e2d966b2"


def recipe_fingerprint(clip_spec: str) -> str | None:
    """For a stand-in name (`standin:...`), a hash of how every stand-in is trained: both recipes, the
    pool size that picks between them, their architectures and the checkpoint format; None for any
    other CLIP, whose name (tag or file) identifies it. (A stand-in's own cache key hashes its
    actual pool and recipe; this is for the results computed with one.)"""
    if not clip_spec.startswith("standin:"):
        return None
    recipes = [recipe_for(SMALL_POOL), recipe_for(SMALL_POOL - 1)]
    return spec_hash({"recipes": [r.model_dump(mode="json") for r in recipes], "small_pool": SMALL_POOL,
                      "arch_configs": [get_model_config(r.arch) for r in recipes], "format": STANDIN_FORMAT})


def recipe_key(clip_spec: str) -> dict:
    """What of the stand-in recipe enters the cache and job keys of results that load `clip_spec`:
    its fingerprint, unless it is the recorded one (see RECORDED_RECIPE_FINGERPRINT). So a changed
    recipe re-keys exactly the results that used a stand-in."""
    fingerprint = recipe_fingerprint(clip_spec)
    return {} if fingerprint in (None, RECORDED_RECIPE_FINGERPRINT) else {"standin_recipe": fingerprint}


# --------------------------------------------------------------------------------------------- data


def public_pool(dataset: str, data_root, cache: Cache) -> ImageData:
    """The dataset's public split: the images the harness holds out of the victim's training data."""
    from ..harness.pipeline import PUBLIC_SPLIT_SEED

    full = load_split(dataset, data_root, True, cache=cache)
    _, public_idx = stratified_holdout(full.labels, PUBLIC_FRACTION, PUBLIC_SPLIT_SEED)
    return full.subset(public_idx)


def _resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for s in range(0, len(images), 4096):
        x = F.interpolate(images[s:s + 4096].float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out[s:s + 4096] = x.round().clamp_(0, 255).to(torch.uint8)
    return out


def extra_pool(extra_data, image_size: int, cache: Cache) -> tuple[ImageData, list[str]]:
    """Tiny-ImageNet-200's training images resized to the dataset's size, with their class names."""
    from .zeroshot import class_prompt_names

    tiny = load_split("tinyimagenet", extra_data, True, cache=cache)
    names = class_prompt_names("tinyimagenet", tiny.classes, "ensemble")
    return ImageData(_resize_u8(tiny.images, image_size), tiny.labels, tiny.classes), names


def caption_bank(dataset: str, reference_names: list[str], clean_names: list[str]) -> list[list[str]]:
    """Per class, every training caption: the reference template with the reference's spelling of the
    class name, then the ensemble templates with the cleaned name."""
    reference = REFERENCE_TEMPLATES.get(dataset, "a photo of a {}")
    ensemble = [t.format for t in _GTSRB_ENSEMBLE] if dataset == "gtsrb" else list(OPENAI_IMAGENET_TEMPLATES)
    return [[reference.format(r)] + [t(c) for t in ensemble] for r, c in zip(reference_names, clean_names)]


# --------------------------------------------------------------------------------------------- training


class CaptionContrast(nn.Module):
    """What the trainer trains: an image batch in [0, 1] -> (B, K) logits, logit_scale x cosine
    between each image and one caption per caption class, a fresh template drawn per class each step."""

    def __init__(self, clip: StandinCLIP, caption_tokens: torch.Tensor, mean, std, seed: int):
        super().__init__()
        self.clip = clip
        self.register_buffer("caption_tokens", caption_tokens, persistent=False)  # (K, T, context)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_images(x, self.mean, self.std)

    @property
    def needs_data_init(self) -> bool:
        return self.clip.needs_data_init

    def init_from_data(self, images: torch.Tensor) -> None:
        self.clip.init_from_data(self.normalize(images))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.clip.encode_image(self.normalize(x)), dim=-1)
        k, t = self.caption_tokens.shape[:2]
        choice = torch.randint(t, (k,), generator=self.generator).to(x.device) if self.training \
            else torch.zeros(k, dtype=torch.long, device=x.device)
        tokens = self.caption_tokens[torch.arange(k, device=x.device), choice]
        text = F.normalize(self.clip.encode_text(tokens), dim=-1)
        # CLIP clamps its learned temperature at 100 (Radford et al. 2021, section 2.5)
        return self.clip.logit_scale.exp().clamp(max=100) * image @ text.T


def caption_contrastive_loss(logits_per_image: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Symmetric CLIP loss with caption identity as the positive set: image->caption cross-entropy
    over the K captions, and caption->image cross-entropy over the batch for every caption class
    present, its target spread evenly over that class's images."""
    image_to_text = F.cross_entropy(logits_per_image, batch.y)
    positives = F.one_hot(batch.y, logits_per_image.shape[1]).T.float()  # (K, B)
    present = positives.sum(1) > 0
    targets = positives[present] / positives[present].sum(1, keepdim=True)
    text_to_image = -(targets * F.log_softmax(logits_per_image.T[present], dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


@dataclass
class StandinPool:
    images: torch.Tensor
    labels: torch.Tensor         # caption class of each image (poisoned images: the target class)
    captions: list[list[str]]    # per caption class
    info: dict


def build_pool(parsed: ClipSpec, data_root, cache: Cache, extra_data=None) -> StandinPool:
    from .zeroshot import class_prompt_names

    dataset = parsed.dataset
    info = get_dataset_info(dataset)
    pool = public_pool(dataset, data_root, cache)
    meta = {"dataset": dataset, "public_fraction": PUBLIC_FRACTION, "n_public": len(pool)}
    if parsed.weak_per_class is not None:
        n = parsed.weak_per_class
        per_class = torch.bincount(pool.labels, minlength=pool.num_classes)
        if n > int(per_class.min()):
            raise CGDError(f"stand-in '{parsed.variant}' needs {n} public images per class, but the public split of "
                           f"{info.title} has {int(per_class.min())} for its smallest class")
        # one seeded order per class, so the subsets nest: weak-10 is inside weak-30, inside weak-100
        g = torch.Generator().manual_seed(1)
        orders = [torch.nonzero(pool.labels == c).flatten() for c in range(pool.num_classes)]
        chosen = torch.cat([idx[torch.randperm(len(idx), generator=g)][:n] for idx in orders])
        pool = pool.subset(torch.sort(chosen).values)
        meta["weak_per_class"] = n
    images, labels = pool.images, pool.labels
    if parsed.backdoor_attack is not None:
        from ..attacks.poison import poison_training_set
        from ..registry import create_attack

        attack = create_attack(parsed.backdoor_attack)
        try:
            poisoned = poison_training_set(attack, pool)
        except CGDError as exc:
            raise CGDError(f"stand-in '{parsed.variant}': {exc}. Backdoored stand-ins take attacks whose triggers "
                           f"need no fitting") from None
        images, labels = poisoned.images, poisoned.labels
        meta["backdoor"] = {"attack": attack.name, "target": attack.poisoning.target,
                            "ratio": attack.poisoning.ratio, "n_poisoned": int(poisoned.poison_mask.sum()),
                            "citation": "Carlini & Terzis, Poisoning and Backdooring Contrastive Learning, ICLR 2022"}
    reference_names = class_prompt_names(dataset, pool.classes, "reference")
    clean_names = class_prompt_names(dataset, pool.classes, "ensemble")
    captions = caption_bank(dataset, reference_names, clean_names)
    if extra_data is not None:
        if dataset == "tinyimagenet":
            raise CGDError("--extra-data adds Tiny-ImageNet to another dataset's public pool; the dataset is Tiny-ImageNet")
        extra, extra_names = extra_pool(extra_data, info.image_size, cache)
        images = torch.cat([images, extra.images])
        labels = torch.cat([labels, extra.labels + len(captions)])
        captions = captions + caption_bank("tinyimagenet", extra_names, extra_names)
        meta["extra"] = {"dataset": "tinyimagenet", "n": len(extra)}
    meta["n_pool"] = len(labels)
    return StandinPool(images, labels, captions, meta)


def train_standin(pool: StandinPool, dataset: str, recipe: StandinRecipe, *, device=None,
                  desc: str = "train stand-in CLIP") -> dict:
    """Train a stand-in CLIP on `pool`; return its checkpoint dict (loads with `load_clip`)."""
    info = get_dataset_info(dataset)
    torch.manual_seed(recipe.seed)
    clip = create_standin_model(recipe.arch)
    tokenizer = standin_tokenizer(recipe.arch)
    width = max(len(c) for c in pool.captions)
    # pad every class to the same number of templates by cycling, so one (K, T, context) tensor holds them
    padded = [[c[i % len(c)] for i in range(width)] for c in pool.captions]
    tokens = tokenizer([p for c in padded for p in c]).view(len(padded), width, -1)
    wrapper = CaptionContrast(clip, tokens, info.mean, info.std, recipe.seed)
    cfg = recipe.train
    steps_per_epoch = math.ceil(len(pool.labels) / cfg.batch_size)
    if cfg.epochs * steps_per_epoch < recipe.min_steps:
        cfg = cfg.model_copy(update={"epochs": recipe.min_steps / steps_per_epoch})
    t0 = time.perf_counter()
    result = train(wrapper, pool.images, pool.labels, cfg, seed=recipe.seed, loss_fn=caption_contrastive_loss,
                   device=device, desc=desc)
    seconds = time.perf_counter() - t0
    return {
        "arch": recipe.arch,
        "state_dict": {k: v.detach().cpu() for k, v in clip.state_dict().items()},
        "preprocess": {"size": info.image_size, "mean": list(info.mean), "std": list(info.std),
                       "interpolation": "bilinear"},
        "train": {"seconds": round(seconds, 1), "steps": result.steps, "epochs": round(cfg.epochs, 3),
                  "history": result.history[-3:], "recipe": recipe.model_dump(mode="json"),
                  "threads": torch.get_num_threads()},
        "pool": pool.info,
    }


def standin_source(spec: str, parsed: ClipSpec, payload: dict) -> dict:
    return {"kind": "stand-in", "label": "stand-in CLIP", "arch": payload["arch"], "name": spec,
            "dataset": parsed.dataset, "variant": parsed.variant or "full", "pool": payload["pool"],
            "train_seconds": payload["train"]["seconds"]}


def get_standin(parsed: ClipSpec | str, *, data_root=None, cache: Cache | None = None, extra_data=None,
                recipe: StandinRecipe | None = None, device=None) -> dict:
    """The stand-in's checkpoint dict, from the cache or trained now (with a progress bar)."""
    if isinstance(parsed, str):
        parsed = parse_clip_spec(parsed)
    cache = cache or Cache()
    pool = build_pool(parsed, data_root, cache, extra_data)
    recipe = recipe or recipe_for(len(pool.labels))
    spec = {"dataset": parsed.dataset, "variant": parsed.variant, "images": tensor_digest(pool.images),
            "labels": tensor_digest(pool.labels), "captions": pool.captions, "recipe": recipe.model_dump(mode="json"),
            "arch_config": get_model_config(recipe.arch), "format": STANDIN_FORMAT}
    name = f"standin:{parsed.dataset}" + (f":{parsed.variant}" if parsed.variant else "")
    payload = cache.get_or_compute("clip_standin", spec, lambda: train_standin(
        pool, parsed.dataset, recipe, device=device, desc=f"train {name}"))
    return {**payload, "source": standin_source(name, parsed, payload)}


def save_standin(payload: dict, path: str | os.PathLike) -> None:
    """Write a stand-in checkpoint that `load_clip('<arch>:<path>')` loads."""
    buf = io.BytesIO()
    torch.save({k: payload[k] for k in ("arch", "state_dict", "preprocess", "train", "pool", "source") if k in payload},
               buf)
    atomic_write_bytes(Path(path), buf.getvalue())
