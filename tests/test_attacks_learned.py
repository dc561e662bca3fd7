"""Learned trigger kinds (cgd_defense/attacks/learned/): at tiny scale each fit yields a trigger of the
declared shape and budget, is deterministic under its seed, and is read back from the cache."""
from __future__ import annotations

import pytest
import torch

from cgd_defense.attacks import parse_attack, poison_training_set, trigger_test_set
from cgd_defense.attacks.learned.lc import corner_pattern
from cgd_defense.attacks.learned.lf import gaussian_lowpass
from cgd_defense.attacks.poison import FitContext, build_components, fit_keys
from cgd_defense.data import ImageData
from cgd_defense.errors import CGDError, ConfigError
from cgd_defense.harness.cache import Cache
from cgd_defense.harness.presets import Preset
from cgd_defense.harness.trainer import TrainConfig
from cgd_defense.registry import get_attack

SIZE = 16
TINY_PRESET = Preset(name="smoke", model="fastnet_small", train=TrainConfig(epochs=1, batch_size=16, lr=0.1))
SURROGATE = {"epochs": 1}

# kind -> (tiny trigger parameters, poisoning policy)
TINY = {
    "label-consistent": ({"steps": 3, "step": 4, "batch_size": 16, "surrogate": {**SURROGATE, "adversarial_eps": 0}},
                         {"clean_label": True}),
    "low-frequency": ({"images": 8, "passes": 2, "batch_size": 4, "surrogate": SURROGATE}, {}),
    "narcissus": ({"passes": 6, "warmup_epochs": 1, "batch_size": 8, "lr": 0.05, "surrogate": SURROGATE},
                  {"clean_label": True, "ratio": 0.05}),
    "trojannn": ({"size": 4, "margin": 1, "iterations": 5, "surrogate": SURROGATE}, {}),
    "input-aware": ({"width": 8, "depth": 2, "mask_epochs": 1, "epochs": 1, "batch_size": 16}, {"cross_ratio": 1}),
    "ssba": ({"width": 8, "depth": 2, "bits": 16, "epochs": 1, "batch_size": 16, "l2_await": 1, "l2_ramp": 1}, {}),
}


@pytest.fixture(scope="module")
def pool() -> ImageData:
    """48 random 16x16 images, 3 classes of 16, each class with its own mean colour."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(16)
    tint = torch.tensor([[60, 0, 0], [0, 60, 0], [0, 0, 60]])[labels].view(-1, 3, 1, 1)
    images = (torch.randint(0, 196, (48, 3, SIZE, SIZE), generator=g) + tint).to(torch.uint8)
    return ImageData(images, labels, ["a", "b", "c"])


def tiny_attack(kind: str, seed: int = 0, **params):
    trigger, policy = TINY[kind]
    family = "clean-label" if policy.get("clean_label") else "dirty-label"
    return parse_attack({"name": kind, "citation": "c", "family": family,
                         "trigger": {"kind": kind, "seed": seed, **trigger, **params},
                         "poisoning": {"ratio": 0.1, "target": 0, **policy}}, "tiny.yaml")


def fitted(kind: str, pool: ImageData, cache: Cache, seed: int = 0, train: bool = True):
    context = FitContext(pool, cache, TINY_PRESET, public=pool.subset(torch.arange(0, 48, 3)))
    return build_components(tiny_attack(kind, seed), SIZE, train, context)[0]


def images_of(pool: ImageData, n: int = 8, label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.nonzero(pool.labels == label).flatten()[:n] if label is not None else torch.arange(n)
    return pool.images[idx].float() / 255, idx


@pytest.mark.parametrize("kind", list(TINY))
def test_fit_is_deterministic_and_read_back_from_the_cache(kind, pool, tmp_path):
    x, idx = images_of(pool, label=0)
    cache = Cache(tmp_path / "a")
    first = fitted(kind, pool, cache).apply(x, idx, train=True)
    fit_misses = [m for m in cache.misses if m.startswith("attack-fit/")]
    assert len(fit_misses) == 1

    again = fitted(kind, pool, cache).apply(x, idx, train=True)  # a new context: nothing held in memory
    assert [h for h in cache.hits if h.startswith("attack-fit/")] == fit_misses
    assert len([m for m in cache.misses if m.startswith("attack-fit/")]) == 1
    assert torch.equal(first, again)

    elsewhere = fitted(kind, pool, Cache(tmp_path / "b")).apply(x, idx, train=True)  # computed afresh
    assert torch.equal(first, elsewhere)
    other_seed = fitted(kind, pool, Cache(tmp_path / "c"), seed=1).apply(x, idx, train=True)
    assert not torch.equal(first, other_seed)


def test_label_consistent_pgd_budget_and_corner_pattern(pool, tmp_path):
    comp = fitted("label-consistent", pool, Cache(tmp_path))
    x, idx = images_of(pool, label=0)
    signs = corner_pattern(SIZE, "all-corners")
    corners = signs != 0
    assert int(corners.sum()) == 36  # a 3x3 pattern in each of the four corners
    assert torch.equal(signs[-3:, :3], signs[:3, :3]) and torch.equal(signs[:3, -3:], signs[:3, :3].flip(1))
    out = comp.apply(x, idx, train=True)
    residual = (out - x)[:, :, ~corners]
    assert residual.abs().max() <= 16 / 255 + 1e-6 and residual.abs().max() > 1 / 255  # PGD moved, within eps
    assert torch.equal(out[:, :, corners], (signs[corners] > 0).float().expand(len(x), 3, -1))  # amplitude 1
    test_out = comp.apply(x, idx, train=False)  # at test time: the corners only
    assert torch.equal(test_out[:, :, ~corners], x[:, :, ~corners])


def test_low_frequency_budget_and_smoothness(pool, tmp_path):
    comp = fitted("low-frequency", pool, Cache(tmp_path))
    v = comp.perturbation
    assert v.shape == (3, SIZE, SIZE)
    assert float(v.min()) == 0 and abs(float(v.max()) - 51 / 255) < 1e-6  # spans [0, eps]
    x, idx = images_of(pool)
    assert (comp.apply(x, idx, train=True) - x).abs().max() <= 51 / 255 + 1e-6
    spectrum = torch.fft.fftshift(torch.fft.fft2(v - v.mean(dim=(1, 2), keepdim=True)).abs() ** 2, dim=(-2, -1))
    yy, xx = torch.meshgrid(torch.arange(SIZE) - SIZE // 2, torch.arange(SIZE) - SIZE // 2, indexing="ij")
    high = (yy ** 2 + xx ** 2) > (SIZE // 4) ** 2
    assert spectrum[:, high].sum() < 0.01 * spectrum.sum()  # the low-pass leaves almost no high frequencies
    white = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert gaussian_lowpass(white, 6.0, 30).diff(dim=-1).abs().mean() < 0.05 * white.diff(dim=-1).abs().mean()


def test_narcissus_budget_and_test_magnification(pool, tmp_path):
    comp = fitted("narcissus", pool, Cache(tmp_path))
    assert comp.trigger.shape == (3, SIZE, SIZE)
    assert comp.trigger.abs().max() <= 16 / 255 + 1e-6 and comp.trigger.abs().max() > 0
    x = torch.full((2, 3, SIZE, SIZE), 0.5)
    idx = torch.arange(2)
    assert torch.allclose(comp.apply(x, idx, train=False, strength=3) - x, 3 * comp.trigger.expand(2, -1, -1, -1),
                          atol=1e-6)


def test_narcissus_fit_that_never_leaves_zero_is_an_error_not_a_trigger(pool, tmp_path):
    # a learning rate too small to move the trigger stands in for a vanished gradient
    context = FitContext(pool, Cache(tmp_path), TINY_PRESET, public=pool.subset(torch.arange(0, 48, 3)))
    with pytest.raises(CGDError, match="narcissus: trigger generation stalled"):
        build_components(tiny_attack("narcissus", lr=1e-12), SIZE, True, context)


def test_trojannn_patch_size_and_place(pool, tmp_path):
    comp = fitted("trojannn", pool, Cache(tmp_path))
    assert comp.patch.shape == (3, 4, 4)
    assert comp.patch.min() >= 1 - 0.3 - 1e-6  # within eps of the white start
    x, idx = images_of(pool)
    out = comp.apply(x, idx, train=True)
    changed = (out != x).any(dim=1).any(dim=0)
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[SIZE - 5:SIZE - 1, SIZE - 5:SIZE - 1] = True  # 4x4, 1 pixel from the bottom-right corner
    assert not changed[~inside].any()
    assert torch.allclose(out[:, :, inside], comp.patch.flatten(1).expand(len(x), -1, -1), atol=1e-6)


@pytest.mark.parametrize("kind", ["input-aware", "ssba"])
def test_sample_specific_kinds_give_each_image_its_own_residual(kind, pool, tmp_path):
    comp = fitted(kind, pool, Cache(tmp_path))
    x, idx = images_of(pool, n=12)
    residuals = (comp.apply(x, idx, train=True) - x).flatten(1)
    assert residuals.abs().amax(1).min() > 0  # every image is changed
    distances = torch.cdist(residuals, residuals)
    assert distances[~torch.eye(len(x), dtype=torch.bool)].min() > 1e-3  # no two residuals alike
    # and not one shared pattern plus noise: the residuals vary about as much as they are large
    assert (residuals - residuals.mean(0)).norm(dim=1).mean() > 0.1 * residuals.norm(dim=1).mean()


def test_input_aware_cross_samples_borrow_another_images_trigger(pool, tmp_path):
    comp = fitted("input-aware", pool, Cache(tmp_path))
    x, idx = images_of(pool, n=6)
    own, cross = comp.apply(x, idx, train=True), comp.cross_variant().apply(x, idx, train=True)
    assert not torch.equal(own, cross)
    assert torch.equal(cross, comp.cross_variant().apply(x, idx, train=True))  # partners are seeded per index


def test_poisoner_fits_learned_components_and_keys_the_poisoned_set(pool, tmp_path):
    spec = tiny_attack("narcissus")
    with pytest.raises(CGDError, match="FitContext"):
        poison_training_set(spec, pool)
    cache = Cache(tmp_path)
    context = FitContext(pool, cache, TINY_PRESET)  # no public split: a seeded slice stands in
    poisoned = poison_training_set(spec, pool, context)
    assert int(poisoned.poison_mask.sum()) == 2  # round(0.05 * 48), clean-label from the target class
    assert torch.equal(poisoned.labels, pool.labels)
    changed = (poisoned.images != pool.images).flatten(1).any(1)
    assert changed.any() and not (changed & (pool.labels != 0)).any()
    triggered = trigger_test_set(spec, pool, context)
    assert len(triggered.true_labels) == 32
    keys = fit_keys(spec, SIZE, context)
    assert len(keys) == 1 and keys == fit_keys(spec, SIZE, FitContext(pool, cache, TINY_PRESET))
    other = TINY_PRESET.model_copy(update={"train": TINY_PRESET.train.model_copy(update={"batch_size": 32})})
    assert fit_keys(spec, SIZE, FitContext(pool, cache, other)) != keys  # the surrogate's recipe is in the key


def test_shipped_learned_attacks_scale_with_the_preset():
    lc = get_attack("lc").components(32)[0]
    assert lc.params.for_preset("paper").surrogate.adversarial_eps == 8
    assert lc.params.for_preset("quick").surrogate.adversarial_eps == 0
    assert lc.params.for_preset("quick").eps == 16  # sizes change, the budget does not
    narcissus = get_attack("narcissus")
    assert narcissus.poisoning.ratio == 0.0005 and narcissus.test.strength == 3 and narcissus.poisoning.clean_label
    for name in ("lc", "inputaware", "lf", "ssba", "trojannn", "narcissus"):
        assert hasattr(get_attack(name).components(32)[0], "fit")


@pytest.mark.parametrize("presets,message", [
    ({"fast": {"passes": 1}}, r"presets: unknown preset 'fast'"),
    ({"smoke": {"passes": 0}}, r"presets.smoke: passes"),
    ({"smoke": {"surrogate": {"epocs": 1}}}, r"presets.smoke: surrogate.epocs"),
])
def test_preset_tables_are_validated(presets, message):
    data = {"name": "x", "citation": "c", "family": "dirty-label",
            "trigger": {"kind": "low-frequency", "presets": presets}}
    with pytest.raises(ConfigError, match=message):
        parse_attack(data, "x.yaml")
