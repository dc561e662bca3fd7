"""CLIP factory, zero-shot scoring and its feature cache, on a tiny stand-in and a tiny open_clip ViT."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cgd_defense.clip import load_clip, parse_clip_spec, zero_shot_logits
from cgd_defense.clip.factory import (CPU_SCORING_BATCH, clip_from_standin_payload, local_weights_path,
                                      scoring_batch_size)
from cgd_defense.clip.standin import (PUBLIC_FRACTION, StandinPool, StandinRecipe, caption_bank, save_standin,
                                      train_standin)
from cgd_defense.clip.zeroshot import clear_memo, image_features, prompts_for
from cgd_defense.errors import CGDError, ConfigError
from cgd_defense.harness.cache import Cache
from cgd_defense.harness.presets import load_presets
from cgd_defense.harness.trainer import TrainConfig

CLASSES = ["airplane", "automobile", "bird"]


def tiny_recipe(steps: int = 4) -> StandinRecipe:
    return StandinRecipe(arch="cgd-standin-tiny", min_steps=steps,
                         train=TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=2e-3, precision="fp32",
                                                            channels_last=False))


@pytest.fixture(scope="module")
def tiny_payload() -> dict:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(16)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    pool = StandinPool(images, labels, caption_bank("cifar10", CLASSES, CLASSES), {"n_pool": 48})
    return train_standin(pool, "cifar10", tiny_recipe())


@pytest.fixture
def tiny_clip(tiny_payload):
    clip = clip_from_standin_payload(tiny_payload, "cgd-standin-tiny:test", torch.device("cpu"),
                                     {"kind": "stand-in", "label": "stand-in CLIP"})
    clip.precision, clip.channels_last = "fp32", False  # exact comparison with a plain fp32 forward
    clear_memo()
    return clip


def _images(n=6, seed=1):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("spec, kind, extra", [
    ("ViT-B-32:laion2b_s34b_b79k", "pretrained", {"arch": "ViT-B-32", "tag": "laion2b_s34b_b79k"}),
    ("ViT-B-32:/data/open_clip_pytorch_model.bin", "local", {"path": "/data/open_clip_pytorch_model.bin"}),
    ("RN50:model.pt", "local", {"arch": "RN50", "path": "model.pt"}),
    ("ViT-B-32", "random", {"arch": "ViT-B-32"}),
    ("cgd-standin:/tmp/standin.pt", "local", {"arch": "cgd-standin"}),
    ("standin:cifar10", "stand-in", {"dataset": "cifar10", "variant": None}),
    ("standin:gtsrb:weak-30", "stand-in", {"dataset": "gtsrb", "variant": "weak-30"}),
    ("standin:cifar10:backdoored-badnets", "stand-in", {"variant": "backdoored-badnets"}),
])
def test_every_name_form_parses(spec, kind, extra):
    parsed = parse_clip_spec(spec)
    assert parsed.kind == kind
    for key, value in extra.items():
        assert getattr(parsed, key) == value
    if parsed.variant == "weak-30":
        assert parsed.weak_per_class == 30 and parsed.backdoor_attack is None
    if parsed.variant == "backdoored-badnets":
        assert parsed.backdoor_attack == "badnets"


@pytest.mark.parametrize("spec, message", [
    ("", "empty CLIP name"),
    ("standin:", "standin:DATASET"),
    ("standin:cifar11", "unknown dataset 'cifar11'. Did you mean 'cifar10'"),
    ("standin:cifar10:strong", "unknown stand-in variant 'strong'"),
    ("standin:cifar10:weak-0", "N >= 1"),
    ("standin:cifar10:backdoored-badnet", "unknown attack 'badnet'. Did you mean 'badnets'"),
    ("standin:cifar10:weak-3:x", "standin:DATASET or standin:DATASET:VARIANT"),
    ("ViT-B-33:laion2b_s34b_b79k", "unknown CLIP architecture 'ViT-B-33'"),
    ("ViT-B-32:laion2b_s34b_b78k", "unknown pretrained tag for ViT-B-32 'laion2b_s34b_b78k'. Did you mean 'laion2b_s34b_b79k'"),
    ("cgd-standin:openai", "has no pretrained tags"),
])
def test_bad_names_fail_clearly(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_clip_spec(spec)


def test_offline_tag_without_file_names_model_tag_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_OFFLINE", "1")
    monkeypatch.setenv("CGD_CLIP_WEIGHTS", str(tmp_path))
    expected = tmp_path / "ViT-B-32" / "laion2b_s34b_b79k" / "open_clip_pytorch_model.bin"
    assert local_weights_path("ViT-B-32", "laion2b_s34b_b79k") == expected
    with pytest.raises(CGDError) as err:
        load_clip("ViT-B-32:laion2b_s34b_b79k", device="cpu")
    assert "ViT-B-32" in str(err.value) and "laion2b_s34b_b79k" in str(err.value) and str(expected) in str(err.value)


def test_missing_local_file_and_random_weights_are_refused(tmp_path):
    missing = tmp_path / "nope" / "open_clip_pytorch_model.bin"
    with pytest.raises(CGDError, match=str(missing)):
        load_clip(f"ViT-B-32:{missing}", device="cpu")
    with pytest.raises(CGDError, match="require_pretrained=False"):
        load_clip("ViT-B-32", device="cpu")


def test_stand_in_dataset_must_match_the_data():
    with pytest.raises(ConfigError, match="use standin:gtsrb"):
        load_clip("standin:cifar10", dataset="gtsrb")


def test_public_split_fraction_matches_every_preset():
    assert {p.public_fraction for p in load_presets().values()} == {PUBLIC_FRACTION}


# --------------------------------------------------------------------------------------------- scoring


def test_zero_shot_logits_match_a_direct_forward(tiny_clip, tiny_payload):
    images = _images()
    logits = zero_shot_logits(tiny_clip, images, "cifar10", CLASSES)
    net = tiny_clip.model
    mean = torch.tensor(tiny_payload["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(tiny_payload["preprocess"]["std"]).view(1, 3, 1, 1)
    tokens = tiny_clip.tokenizer([f"a photo of a {c}" for c in CLASSES])
    with torch.no_grad():
        image_f, text_f, scale = net((images.float() / 255 - mean) / std, tokens)
    assert logits.shape == (6, 3) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, image_f @ text_f.T, atol=1e-5, rtol=1e-5)
    assert abs(tiny_clip.logit_scale - float(scale)) < 1e-4
    assert tiny_clip.source["label"] == "stand-in CLIP"


def test_bf16_scoring_tower_folds_batchnorm_and_agrees_with_fp32(tiny_clip):
    images = _images(16)
    fp32 = tiny_clip.encode_images(images)
    tiny_clip.precision, tiny_clip.channels_last = "bf16", True
    bf16 = tiny_clip.encode_images(images)
    tower = tiny_clip._image_tower()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_clip.model.visual.modules())  # the model is untouched
    assert tiny_clip.preprocess_cfg()["conv_batchnorm_folded"]
    assert F.cosine_similarity(fp32, bf16, dim=1).min() > 0.99


def test_cpu_scoring_takes_small_batches_and_the_batch_does_not_change_the_features(tiny_clip):
    assert tiny_clip.batch_size == CPU_SCORING_BATCH
    assert scoring_batch_size(torch.device("cuda"), gpu_batch=1024) == 1024
    images = _images(2 * CPU_SCORING_BATCH + 3)
    torch.testing.assert_close(tiny_clip.encode_images(images, batch_size=7), tiny_clip.encode_images(images),
                               atol=1e-5, rtol=1e-5)


def test_zero_shot_logits_match_open_clip_reference_pipeline(tmp_path):
    """A random tiny open_clip ViT scored through our batched preprocessing equals the CGD reference's
    pipeline: torchvision Resize/CenterCrop/Normalize from open_clip's own transform, per image."""
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cgd-test-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cgd-test-vit.json")
    clip = load_clip("cgd-test-vit", device="cpu", require_pretrained=False)
    clip.precision, clip.channels_last = "fp32", False
    assert clip.source["kind"] == "random" and clip.image_size == 64
    images = _images(4)
    logits = zero_shot_logits(clip, images, "cifar10", CLASSES)
    _, _, preprocess = open_clip.create_model_and_transforms("cgd-test-vit")
    resize, crop, normalize = preprocess.transforms[0], preprocess.transforms[1], preprocess.transforms[-1]
    x = torch.stack([normalize(crop(resize(img.float() / 255))) for img in images])
    with torch.no_grad():
        image_f = F.normalize(clip.model.encode_image(x), dim=-1)
        text_f = F.normalize(clip.model.encode_text(open_clip.get_tokenizer("cgd-test-vit")(
            [f"a photo of a {c}" for c in CLASSES])), dim=-1)
    torch.testing.assert_close(logits, image_f @ text_f.T, atol=1e-4, rtol=1e-4)


def test_ensemble_templates_and_gtsrb_names():
    ensemble = prompts_for("cifar100", ["aquarium_fish"], "ensemble")[0]
    assert len(ensemble) == 80 and "a photo of a aquarium fish." in ensemble
    assert prompts_for("cifar100", ["aquarium_fish"])[0] == ["a photo of a aquarium_fish"]
    assert prompts_for("gtsrb", ["00014"])[0] == ["a centered photo of a red and white octagonal stop sign traffic sign"]
    assert prompts_for("tinyimagenet", ["n01443537"])[0] == ["a photo of a goldfish"]


# --------------------------------------------------------------------------------------------- cache


def test_feature_cache_hit_invalidation_and_corruption(tiny_clip, tmp_path):
    cache = Cache(tmp_path)
    images = _images(8)
    first = image_features(tiny_clip, images, cache)
    clear_memo()
    again = image_features(tiny_clip, images, cache)
    assert [h.split("/")[0] for h in cache.hits] == ["clip_image"] and torch.equal(first, again)

    changed = images.clone()
    changed[3, 0, 5, 5] ^= 1  # one pixel of one image
    clear_memo()
    other = image_features(tiny_clip, changed, cache)
    assert len(cache.misses) == 2
    assert torch.equal(other[[0, 1, 2, 4, 5, 6, 7]], first[[0, 1, 2, 4, 5, 6, 7]]) and not torch.equal(other[3], first[3])

    entries = sorted((tmp_path / "clip_image").rglob("*.pt"))
    assert len(entries) == 2
    for entry in entries:
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    clear_memo()
    recomputed = image_features(tiny_clip, images, cache)
    assert len(cache.misses) == 3 and torch.equal(recomputed, first)


def test_cached_rerun_is_fast(tiny_clip, tmp_path):
    import time

    cache = Cache(tmp_path)
    images = _images(64)
    zero_shot_logits(tiny_clip, images, "cifar10", CLASSES, cache=cache)
    t0 = time.perf_counter()
    zero_shot_logits(tiny_clip, images, "cifar10", CLASSES, cache=cache)
    assert time.perf_counter() - t0 < 0.5


def test_saved_stand_in_loads_through_the_factory(tiny_payload, tiny_clip, tmp_path):
    path = tmp_path / "standin.pt"
    save_standin(tiny_payload, path)
    loaded = load_clip(f"cgd-standin-tiny:{path}", device="cpu")
    loaded.precision, loaded.channels_last = "fp32", False
    assert loaded.source["kind"] == "local" and loaded.source["label"] == "stand-in CLIP"
    assert loaded.identity == tiny_clip.identity
    images = _images()
    torch.testing.assert_close(zero_shot_logits(loaded, images, "cifar10", CLASSES),
                               zero_shot_logits(tiny_clip, images, "cifar10", CLASSES))


def test_in_place_change_of_the_images_is_not_served_from_the_memo(tiny_clip):
    images = _images(4)
    before = image_features(tiny_clip, images)
    images[2, :, :4, :4] = 255  # same tensor object, changed in place
    after = image_features(tiny_clip, images)
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]]) and not torch.equal(after[2], before[2])
