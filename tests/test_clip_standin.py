"""Stand-in CLIP training: the caption-contrastive loss, weak subsets, and a backdoored stand-in."""
from __future__ import annotations

import torch

from cgd_defense.attacks.poison import apply_components, poison_training_set
from cgd_defense.clip.factory import clip_from_standin_payload, parse_clip_spec
from cgd_defense.clip.standin import (StandinPool, StandinRecipe, caption_bank, caption_contrastive_loss,
                                      recipe_for, train_standin)
from cgd_defense.clip.zeroshot import clear_memo, zero_shot_logits
from cgd_defense.data import ImageData
from cgd_defense.harness.trainer import Batch, TrainConfig
from cgd_defense.registry import create_attack

CLASSES = ["airplane", "automobile", "bird", "cat"]


def _coloured(n_per_class: int, seed: int) -> ImageData:
    """Noise images whose class is a colour cast: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat(n_per_class)
    images = torch.randint(0, 120, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=g)
    for c in range(3):
        images[labels == c + 1, c] += 100
    return ImageData(images, labels, CLASSES)


def test_caption_contrastive_loss_is_low_when_images_match_their_captions():
    y = torch.tensor([0, 0, 1, 2])
    matching = torch.full((4, 3), -10.0)
    matching[torch.arange(4), y] = 10.0
    batch = Batch(torch.zeros(4, 3, 2, 2), y, torch.arange(4))
    assert caption_contrastive_loss(matching, batch) < 0.75  # two equal positives for caption 0: log 2 / 2
    assert caption_contrastive_loss(-matching, batch) > 10


def test_small_pools_get_the_small_recipe():
    assert recipe_for(1000).arch == "cgd-standin-small" and recipe_for(10_000).arch == "cgd-standin"


def test_backdoored_stand_in_maps_triggered_images_to_the_target():
    attack = create_attack("badnets", **{"poisoning.ratio": 0.3})
    pool = poison_training_set(attack, _coloured(48, seed=0))
    assert int(pool.poison_mask.sum()) == round(0.3 * 192)
    standin_pool = StandinPool(pool.images, pool.labels, caption_bank("cifar10", CLASSES, CLASSES), {})
    recipe = StandinRecipe(arch="cgd-standin-tiny", min_steps=80,
                           train=TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=2e-3, crop_padding=0,
                                             flip=False))
    payload = train_standin(standin_pool, "cifar10", recipe)
    clip = clip_from_standin_payload(payload, "standin:test:backdoored-badnets", torch.device("cpu"),
                                     {"kind": "stand-in", "label": "stand-in CLIP"})
    clear_memo()
    test = _coloured(20, seed=1)
    non_target = test.subset(torch.nonzero(test.labels != attack.poisoning.target).flatten())
    triggered = apply_components(attack.components(32, train=False), non_target.images,
                                 torch.arange(len(non_target)), train=False)
    target = attack.poisoning.target

    def target_probability(images):
        logits = zero_shot_logits(clip, images, "cifar10", CLASSES)
        return torch.softmax(clip.logit_scale * logits, dim=1)[:, target].mean().item()

    clean_p, triggered_p = target_probability(non_target.images), target_probability(triggered)
    assert triggered_p > clean_p + 0.2, (clean_p, triggered_p)


def test_weak_variant_parses_to_images_per_class():
    assert parse_clip_spec("standin:cifar10:weak-10").weak_per_class == 10


def _fake_tiny_imagenet(root, wnids=("n01443537", "n12267677"), per_class=3):
    """A Tiny-ImageNet-200 folder in its published layout, with a few 64x64 JPEGs per class."""
    import numpy as np
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rows = []
    for k, w in enumerate(wnids):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((64, 64, 3), 40 * k + i, dtype=np.uint8)).save(folder / f"{w}_{i}.JPEG")
        Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(base / "val" / "images" / f"val_{k}.JPEG")
        rows.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def test_public_pool_weak_subsets_nest_and_extra_data_widens_the_pool(mini_root, session_cache_dir, tmp_path):
    from cgd_defense.clip.standin import build_pool
    from cgd_defense.harness.cache import Cache

    cache = Cache(session_cache_dir)
    full = build_pool(parse_clip_spec("standin:cifar10"), mini_root, cache)
    assert len(full.labels) == 1000 and torch.bincount(full.labels).tolist() == [100] * 10
    weak = {n: build_pool(parse_clip_spec(f"standin:cifar10:weak-{n}"), mini_root, cache) for n in (3, 10)}
    assert torch.bincount(weak[3].labels).tolist() == [3] * 10
    as_rows = lambda p: {tuple(img.flatten()[:64].tolist()) for img in p.images}  # noqa: E731
    assert as_rows(weak[3]) <= as_rows(weak[10]) <= as_rows(full)

    _fake_tiny_imagenet(tmp_path)
    wide = build_pool(parse_clip_spec("standin:cifar10"), mini_root, cache, extra_data=tmp_path)
    assert len(wide.labels) == 1006 and wide.images.shape[1:] == (3, 32, 32)
    assert wide.labels[-6:].tolist() == [10, 10, 10, 11, 11, 11]
    assert wide.captions[10][0] == "a photo of a goldfish" and wide.captions[11][0] == "a photo of a acorn"
    assert wide.info["extra"] == {"dataset": "tinyimagenet", "n": 6}


def test_whitened_image_tower_is_set_from_the_pool_and_survives_the_factory(tmp_path):
    """A stand-in whose image tower has a whitening stem: the trainer sets the stem from the pool's
    normalised images before the first step, and a saved checkpoint loads with the stem as trained."""
    import json

    from cgd_defense.clip.model import add_model_config

    cfg = {"embed_dim": 16, "vision_cfg": {"tower": "fastnet_whitened", "image_size": 32, "widths": [8, 16, 16]},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "cgd-test-whitened.json").write_text(json.dumps(cfg))
    add_model_config(tmp_path / "cgd-test-whitened.json")
    data = _coloured(8, seed=0)
    pool = StandinPool(data.images, data.labels, caption_bank("cifar10", CLASSES, CLASSES), {})
    recipe = StandinRecipe(arch="cgd-test-whitened", min_steps=4,
                           train=TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, precision="fp32"))
    payload = train_standin(pool, "cifar10", recipe)
    assert bool(payload["state_dict"]["visual.whitened"])
    clip = clip_from_standin_payload(payload, "cgd-test-whitened:x", torch.device("cpu"),
                                     {"kind": "stand-in", "label": "stand-in CLIP"})
    assert not clip.model.needs_data_init
    torch.testing.assert_close(clip.model.visual.whiten.weight, payload["state_dict"]["visual.whiten.weight"])
    # the stem whitens the pool: its 2x2 patches, normalised as the tower sees them, come out decorrelated
    mean = torch.tensor(payload["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(payload["preprocess"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = torch.nn.functional.conv2d((data.images.float() / 255 - mean) / std, clip.model.visual.whiten.weight[:12])
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(flat.T)
    assert (cov - torch.diag(torch.diag(cov))).abs().max() < 0.05 * torch.diag(cov).max()
