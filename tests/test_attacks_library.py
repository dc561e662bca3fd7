"""The attack library: every trigger kind on tiny tensors, the poisoning policies' exact counts and
label maps, validation errors, composition, and the `attacks validate / preview / list` commands."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cgd_defense.attacks import parse_attack, poison_training_set, trigger_test_set
from cgd_defense.attacks.poison import apply_components
from cgd_defense.attacks.preview import distortion, ssim
from cgd_defense.attacks.spec import TriggerComponent
from cgd_defense.config import PROJECT_ROOT
from cgd_defense.data import ImageData
from cgd_defense.errors import ConfigError
from cgd_defense.registry import create_attack, list_attacks

NEW_ATTACKS = ["sig", "wanet", "cleanimage", "adaptive-blend", "badnets-all2all"]


def build(kind: str, image_size: int = 8, **params):
    return TriggerComponent(kind=kind, params=params).build(image_size, 0)


def attack(trigger, **poisoning):
    return parse_attack({"name": "t", "citation": "c", "family": "dirty-label", "trigger": trigger,
                         "poisoning": poisoning}, "t.yaml")


@pytest.fixture
def ten_class_data() -> ImageData:
    """200 random 16x16 images, 10 classes of 20."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8, generator=g)
    return ImageData(images, torch.arange(10).repeat_interleave(20), [f"c{i}" for i in range(10)])


# ---------------------------------------------------------------------------------------------- kinds

def test_patch_pixels_at_xy_and_random_locations():
    x = torch.full((2, 3, 8, 8), 0.5)
    out = build("patch", pattern="checkerboard", size=2, location="xy", xy=[1, 4]).apply(x, torch.tensor([0, 1]), True)
    assert torch.equal(out[:, :, 4:6, 1:3], torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(2, 3, 2, 2))
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[4:6, 1:3] = False
    assert (out[:, :, untouched] == 0.5).all()
    rnd = build("patch", pattern="white", size=3, location="random", seed=3)
    a = rnd.apply(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), True)
    assert (a.sum(dim=(1, 2, 3)) == 27).all()  # one whole 3x3 patch inside the image, per image
    again = rnd.apply(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), True)
    assert torch.equal(a, again)  # a function of (seed, index), not of call order
    assert len({tuple(torch.nonzero(img[0])[0].tolist()) for img in a}) > 1


def test_blend_pixels_inside_region_only():
    x = torch.zeros(1, 3, 8, 8)
    out = build("blend", source="pattern", pattern="white", alpha=0.25, region=[2, 1, 3, 2]).apply(x, torch.tensor([0]), True)
    expected = torch.zeros(1, 3, 8, 8)
    expected[:, :, 1:3, 2:5] = 0.25
    assert torch.equal(out, expected)


def test_partial_blend_leaves_exactly_the_masked_cells_and_full_trigger_at_test():
    comp = build("blend", source="pattern", pattern="white", alpha=0.5, pieces=16, mask_rate=0.5)
    x = torch.zeros(3, 3, 8, 8)
    out = comp.apply(x, torch.tensor([5, 6, 7]), True)
    cells = out[:, 0].reshape(3, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(3, 16, 4)
    assert ((cells == 0.5).all(-1) | (cells == 0).all(-1)).all()  # each 2x2 cell is blended or not, whole
    assert ((cells == 0).all(-1).sum(1) == 8).all()  # exactly round(0.5 * 16) cells left out per image
    assert not torch.equal(out[0], out[1])  # a different random half per image
    assert torch.equal(out, comp.apply(x, torch.tensor([5, 6, 7]), True))
    spec = parse_attack({"name": "a", "citation": "c", "family": "dirty-label",
                         "trigger": {"kind": "blend", "source": "pattern", "pattern": "white", "alpha": 0.5,
                                     "pieces": 16, "mask_rate": 0.5},
                         "test": {"params": [{"mask_rate": 0.0, "alpha": 0.25}]}}, "a.yaml")
    test_comp = spec.components(8, train=False)[0]
    assert torch.equal(test_comp.apply(x[:1], torch.tensor([0]), False), torch.full((1, 3, 8, 8), 0.25))


def test_sig_adds_the_horizontal_sinusoid_and_clips():
    comp = build("sig", delta=40, frequency=2)
    x = torch.full((1, 3, 4, 8), 0.5)
    out = comp.apply(x, torch.tensor([0]), True)
    j = torch.arange(8, dtype=torch.float64)
    expected = 0.5 + 40 / 255 * torch.sin(2 * math.pi * j * 2 / 8)
    assert torch.allclose(out, expected.float().expand(1, 3, 4, 8), atol=1e-6)  # same in every row and channel
    high = comp.apply(torch.ones(1, 3, 4, 8), torch.tensor([0]), True)
    assert high.max() == 1 and torch.allclose(high[0, 0, 0, 3], torch.tensor(1 - 40 / 255))  # sin(3 pi / 2) = -1
    assert torch.allclose(comp.apply(x, torch.tensor([0]), False, strength=0.5) - 0.5, (out - 0.5) / 2, atol=1e-6)


def _ramp(n: int) -> torch.Tensor:
    """Channel 0 = column index, channel 1 = row index (scaled to [0, 1]): bilinear warping of a linear
    ramp returns the sampling position itself, so output - input is the displacement in pixels/(n-1)."""
    axis = torch.arange(n, dtype=torch.float32) / (n - 1)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([cols, rows, torch.zeros(n, n)]).unsqueeze(0)


def test_warp_is_identity_at_zero_strength_and_smooth_and_bounded():
    n = 32
    comp = build("warp", image_size=n, k=4, s=0.5, seed=0)
    x = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(comp.apply(x, torch.tensor([0, 1]), True, strength=0.0), x, atol=1e-5)
    assert torch.allclose(build("warp", image_size=n, s=0.0).apply(x, torch.tensor([0, 1]), True), x, atol=1e-5)
    out = comp.apply(x, torch.tensor([0, 1]), True)
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x, atol=1e-3)
    shift = (comp.apply(_ramp(n), torch.tensor([0]), True) - _ramp(n))[0, :2] * (n - 1)  # pixels
    bound = 0.5 * float(comp.field.abs().max()) / 2 + 1e-4
    assert float(shift.abs().max()) <= bound and float(shift.abs().max()) > 0.1
    inner = shift[:, 1:-1, 1:-1]  # the grid is clamped to the image on its outermost pixels
    step = max(float((inner[:, 1:] - inner[:, :-1]).abs().max()), float((inner[:, :, 1:] - inner[:, :, :-1]).abs().max()))
    assert step < 0.25 * float(inner.abs().max())  # smooth: neighbouring pixels move nearly alike
    assert torch.equal(out, build("warp", image_size=n, k=4, s=0.5, seed=0).apply(x, torch.tensor([0, 1]), True))
    assert not torch.allclose(out, build("warp", image_size=n, seed=1).apply(x, torch.tensor([0, 1]), True))


def test_warp_cross_variant_adds_per_image_jitter_of_at_most_half_a_pixel():
    n = 32
    comp = build("warp", image_size=n)
    noisy = comp.cross_variant()
    ramp = _ramp(n).expand(2, -1, -1, -1)
    plain = comp.apply(ramp, torch.tensor([3, 4]), True)
    jittered = noisy.apply(ramp, torch.tensor([3, 4]), True)
    extra = (jittered - plain)[:, :2] * (n - 1)
    assert 0.05 < float(extra.abs().max()) <= 0.5 * (n - 1) / n + 1e-4
    assert not torch.allclose(jittered[0], jittered[1])
    assert torch.equal(jittered, noisy.apply(ramp, torch.tensor([3, 4]), True))


def test_natural_feature_is_identity_in_training_and_a_colour_shift_at_test():
    comp = build("natural", feature="warmth", threshold=0.25, margin=0.1)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    x[0, 0] = 0.9
    x[0, 2] = 0.1  # warmth 0.8: carries the feature already
    assert comp.carries(x).tolist() == [True, False, False, False]
    assert torch.equal(comp.apply(x, torch.arange(4), True), x)
    shifted = comp.apply(x, torch.arange(4), False)
    assert (comp.feature_value(shifted)[1:] >= 0.35 - 1e-4).all()
    assert torch.equal(shifted[0], x[0])  # already past the level: unchanged
    assert torch.allclose(shifted[1:, 1], x[1:, 1])  # warmth moves R and B only


# ---------------------------------------------------------------------------------------------- policies

def test_shipped_attacks_are_registered_with_their_defaults():
    assert set(NEW_ATTACKS) <= set(list_attacks())
    sig = create_attack("sig")
    assert sig.family == "clean-label" and sig.poisoning.clean_label and sig.trigger[0].params == {"delta": 40, "frequency": 6}
    wanet = create_attack("wanet")
    assert wanet.poisoning.cross_ratio == 2 and wanet.trigger[0].params["k"] == 4 and wanet.trigger[0].params["s"] == 0.5
    ab = create_attack("adaptive-blend")
    assert ab.test.params == [{"alpha": 0.2, "mask_rate": 0.0}] and ab.poisoning.ratio == 0.003
    assert create_attack("badnets-all2all").poisoning.label_mode == "all-to-all"
    assert create_attack("cleanimage").family == "clean-image"


def test_all_to_all_poisons_exact_count_and_maps_labels_to_the_next_class(ten_class_data):
    spec = create_attack("badnets-all2all")
    p = poison_training_set(spec, ten_class_data)
    assert int(p.poison_mask.sum()) == 20  # round(0.1 * 200), from every class
    assert torch.equal(p.labels[p.poison_mask], (p.original_labels[p.poison_mask] + 1) % 10)
    assert torch.equal(p.labels[~p.poison_mask], p.original_labels[~p.poison_mask])
    t = trigger_test_set(spec, ten_class_data)
    assert len(t.indices) == 200 and torch.equal(t.attack_labels, (t.true_labels + 1) % 10)


def test_clean_label_sig_poisons_only_target_images_and_keeps_labels(ten_class_data):
    spec = create_attack("sig", **{"poisoning.target": 3})
    p = poison_training_set(spec, ten_class_data)
    assert int(p.poison_mask.sum()) == 20  # round(0.1 * 200) = every image of the target class
    assert (p.original_labels[p.poison_mask] == 3).all() and torch.equal(p.labels, p.original_labels)
    assert not torch.equal(p.images[p.poison_mask], ten_class_data.images[p.poison_mask])
    assert torch.equal(p.images[~p.poison_mask], ten_class_data.images[~p.poison_mask])
    half = poison_training_set(create_attack("sig", **{"poisoning.ratio": 0.05}), ten_class_data)
    assert int(half.poison_mask.sum()) == 10 and (half.original_labels[half.poison_mask] == 0).all()


def test_wanet_cross_samples_are_disjoint_warped_and_keep_their_labels(ten_class_data):
    p = poison_training_set(create_attack("wanet"), ten_class_data)
    assert int(p.poison_mask.sum()) == 20 and int(p.cross_mask.sum()) == 40  # cross_ratio 2
    assert not (p.poison_mask & p.cross_mask).any()
    assert (p.labels[p.poison_mask] == 0).all() and (p.original_labels[p.poison_mask] != 0).all()
    assert torch.equal(p.labels[p.cross_mask], p.original_labels[p.cross_mask])
    assert not torch.equal(p.images[p.cross_mask], ten_class_data.images[p.cross_mask])


def test_adaptive_blend_cover_samples_match_poison_count(ten_class_data):
    p = poison_training_set(create_attack("adaptive-blend", **{"poisoning.ratio": 0.05}), ten_class_data)
    assert int(p.poison_mask.sum()) == 10 and int(p.cross_mask.sum()) == 10  # conservatism 0.5
    assert torch.equal(p.labels[p.cross_mask], p.original_labels[p.cross_mask])


def test_clean_image_flips_only_carriers_strongest_first_and_changes_no_pixel(ten_class_data):
    images = ten_class_data.images.clone()
    warm = torch.tensor([21, 45, 67, 88, 130, 150])  # non-target images made warm, increasingly so
    for rank, i in enumerate(warm.tolist()):
        images[i, 0], images[i, 2] = 200 + 5 * rank, 20
    images[5, 0], images[5, 2] = 255, 0  # a warm image of the target class: never eligible
    data = ImageData(images, ten_class_data.labels, ten_class_data.classes)
    spec = create_attack("cleanimage", **{"poisoning.ratio": 0.02})  # room for 4 of the 6 carriers
    p = poison_training_set(spec, data)
    assert torch.equal(p.images, data.images)
    assert p.poison_indices.tolist() == sorted(warm[-4:].tolist())
    assert (p.labels[p.poison_mask] == 0).all()
    everything = poison_training_set(create_attack("cleanimage"), data)
    assert everything.poison_indices.tolist() == warm.tolist()  # ratio above the carrier count: all carriers
    t = trigger_test_set(spec, data)
    comp = spec.components(16, train=False)[0]
    assert comp.carries(t.images.float() / 255).float().mean() > 0.95


def test_composed_attack_equals_the_composition(ten_class_data):
    two = [{"kind": "patch", "pattern": "white", "size": 3, "location": "top-left"},
           {"kind": "sig", "delta": 30, "frequency": 3}]
    spec = attack(two, ratio=0.1)
    p = poison_training_set(spec, ten_class_data)
    idx = p.poison_indices
    x = ten_class_data.images[idx].float() / 255
    x = build("patch", 16, pattern="white", size=3, location="top-left").apply(x, idx, True)
    x = build("sig", 16, delta=30, frequency=3).apply(x, idx, True)
    assert torch.equal(p.images[idx], (x.clamp(0, 1) * 255).round().to(torch.uint8))
    one_then_other = apply_components(spec.components(16)[1:], apply_components(spec.components(16)[:1],
                                      ten_class_data.images[idx], idx, True), idx, True)
    assert (p.images[idx].int() - one_then_other.int()).abs().max() <= 1  # up to the intermediate uint8 rounding


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("trigger,poisoning,message", [
    ({"kind": "sig", "delta": 300}, {}, r"t.yaml: trigger\[0\]: field 'delta' .*less than or equal to 255.*300"),
    ({"kind": "sig", "amplitude": 3}, {}, r"trigger\[0\]: unknown field 'amplitude'"),
    ({"kind": "warp", "k": 1}, {}, r"trigger\[0\]: field 'k' .*greater than or equal to 2"),
    ({"kind": "blend", "pieces": 12}, {}, r"trigger\[0\]: field '.*': 'pieces' must be a perfect square"),
    ({"kind": "blend", "mask_rate": 1.0}, {}, r"field 'mask_rate' .*less than 1"),
    ({"kind": "natural", "feature": "coolness"}, {}, r"t.yaml: trigger\[0\]: field 'feature' must be one of 'warmth', 'greenness' or 'brightness'. Got 'coolness'"),
    ({"kind": "patch"}, {"select": "natural-feature"}, r"t.yaml: field 'poisoning.select' is 'natural-feature'.*kinds: natural"),
    ({"kind": "patch"}, {"select": "best"}, r"field 'poisoning.select' must be one of 'random' or 'natural-feature'"),
    ({"kind": "warp"}, {"cross_ratio": -1}, r"field 'poisoning.cross_ratio' .*greater than or equal to 0"),
])
def test_bad_attack_files_name_file_field_and_allowed_values(trigger, poisoning, message):
    with pytest.raises(ConfigError, match=message):
        attack(trigger, **poisoning)


def test_trigger_too_large_for_the_image_fails_when_built():
    with pytest.raises(ValueError, match="k = 40 exceeds the image size 32"):
        build("warp", image_size=32, k=40)
    with pytest.raises(ValueError, match="64 pieces need an image of at least 8x8"):
        build("blend", image_size=4, pieces=64)


def test_distortion_measures():
    a = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    b = a.clone()
    b[1, :, 0, 0] = 255
    d = distortion(a, b)
    assert d.n == 2 and d.linf == pytest.approx(0.5) and d.l2 == pytest.approx(math.sqrt(3) / 2)
    x = torch.rand(1, 3, 16, 16)
    assert float(ssim(x, x)) == pytest.approx(1.0) and float(ssim(x, torch.rand(1, 3, 16, 16))) < 0.5


# ---------------------------------------------------------------------------------------------- CLI

def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cgd_defense.cli", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env={**os.environ, "CGD_PROGRESS": "0", **(env or {})}, timeout=600)


def test_cli_validate_every_shipped_file_and_reject_a_bad_one(tmp_path):
    files = sorted(str(f) for f in (PROJECT_ROOT / "attacks").glob("*.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ncitation: c\nfamily: dirty-label\ntrigger: {kind: warp, s: -1}\n")
    proc = cli("attacks", "validate", *files, str(bad))
    assert proc.returncode == 2
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(files) + 1 and all(line.startswith("ok") for line in lines[:-1])
    assert lines[-1].startswith("invalid") and "bad.yaml: trigger[0]: field 's'" in lines[-1]


def test_cli_list_shows_family_and_source():
    proc = cli("attacks", "list")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(NEW_ATTACKS) <= set(rows)
    assert "clean-label" in rows["sig"] and "Barni et al. 2019" in rows["sig"] and "BackdoorBench" in rows["sig"]
    assert "clean-image" in rows["cleanimage"] and "Nguyen & Tran 2021" in rows["wanet"]


def test_cli_preview_prints_counts_and_distortion_and_writes_the_grid(mini_root, session_cache_dir, tmp_path):
    proc = cli("attacks", "preview", "wanet", "--out", str(tmp_path / "p"), "--data-root", str(mini_root),
               "--per-class", "1", "--cache-dir", str(session_cache_dir))
    assert proc.returncode == 0, proc.stderr
    assert "wanet: 500 of 5000 training images poisoned (ratio 0.1000), 1000 cross" in proc.stdout
    report = json.loads((tmp_path / "p" / "preview.json").read_text())
    assert 0 < report["train_trigger"]["linf"] < 1 and 0.5 < report["train_trigger"]["ssim"] < 1
    assert report["n_poisoned"] == 500 and report["n_cross"] == 1000 and report["test_trigger"]["n"] > 0
    from PIL import Image
    with Image.open(tmp_path / "p" / "preview.png") as im:
        assert im.size[1] > 10 * 32  # one row per class


def test_clean_label_poisons_are_drawn_independently_of_the_validation_split():
    """The harness holds out a stratified validation split with the run seed; a target-only poison draw
    with the same seed once took the very images held out first, so a small budget never reached the
    victim. The overlap must be what independent draws give (a quarter here), not all of it."""
    from cgd_defense.attacks.poison import choose_poison_indices
    from cgd_defense.data import stratified_holdout

    labels = torch.arange(10).repeat_interleave(400)
    spec = create_attack("sig", **{"poisoning.ratio": 0.01})  # 40 poisons among the 400 target images
    poison, _ = choose_poison_indices(spec, labels, 10)
    assert len(poison) == 40 and bool((labels[poison] == spec.poisoning.target).all())
    _, held_out = stratified_holdout(labels, 0.25, seed=spec.poisoning.seed)
    overlap = int(torch.isin(poison, held_out).sum())
    assert 3 <= overlap <= 20
