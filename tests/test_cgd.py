"""CGD: ranks and the split rule, the loss terms, class balancing, early stopping, the split on a
synthetic poisoned set (with a fake CLIP: the CLIP layer is tested on its own), the entropy map."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cgd_defense.attacks.poison import PoisonedData
from cgd_defense.data import ImageData
from cgd_defense.defenses import cgd as cgd_module
from cgd_defense.defenses.base import DefenseContext
from cgd_defense.defenses.cgd import CGD, ValidationAccuracyStop, write_split_file
from cgd_defense.defenses.cgd_losses import (ROLE_CLEAN, ROLE_REST, ROLE_SUSPECT, cgd_loss, distillation_term,
                                             fit_temperature_scale, unlearning_term)
from cgd_defense.defenses.cgd_split import (auto_sigma, balance_clean_indices, combined_score, rank_normalize,
                                            split_masks)
from cgd_defense.errors import ConfigError
from cgd_defense.harness.cache import Cache
from cgd_defense.harness.presets import get_preset
from cgd_defense.models import Classifier, create_model


# ---------------------------------------------------------------------------------------------- ranks and rule

def reference_split(clip_nll: np.ndarray, kfold_nll: np.ndarray, sigma1=0.2, sigma2=0.1):
    """The authors' lines, transcribed: visualization.py:233-243 and cgd.py:324,334."""
    clip_norm = (np.argsort(np.argsort(clip_nll)) + 1) / len(clip_nll)
    kfold_norm = (np.argsort(np.argsort(kfold_nll)) + 1) / len(kfold_nll)
    clean = (clip_norm <= 1 - sigma1) & (kfold_norm >= sigma1)
    suspect = (clip_norm > 1 - sigma2) | (kfold_norm < sigma2)
    return clip_norm, kfold_norm, clean, suspect


def test_rank_normalize_is_rank_over_n_with_one_for_the_lowest():
    r = rank_normalize(torch.tensor([3.0, 1.0, 2.0, 5.0]))
    assert r.dtype == torch.float64
    assert r.tolist() == [0.75, 0.25, 0.5, 1.0]
    assert rank_normalize(torch.tensor([0.0, 0.0, 0.0])).tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])  # ties by order


@pytest.mark.parametrize("n", [1000, 4999])
def test_reference_thresholds_reproduced_exactly(n):
    rng = np.random.default_rng(n)
    clip_nll, kfold_nll = rng.exponential(size=n), rng.exponential(size=n)
    clip_norm, kfold_norm, clean_ref, suspect_ref = reference_split(clip_nll, kfold_nll)
    r_clip, r_susp = rank_normalize(torch.from_numpy(clip_nll)), rank_normalize(torch.from_numpy(kfold_nll))
    assert np.array_equal(r_clip.numpy(), clip_norm) and np.array_equal(r_susp.numpy(), kfold_norm)
    clean, suspect = split_masks(r_clip, r_susp, 0.2, 0.1)
    assert np.array_equal(clean.numpy(), clean_ref) and np.array_equal(suspect.numpy(), suspect_ref)
    assert not (clean & suspect).any()
    # the combined score thresholds the same sets
    combined = combined_score(r_clip, r_susp)
    assert torch.equal(suspect, combined > 1 - 0.1) and torch.equal(clean, combined <= 1 - 0.2)


def test_split_rule_boundaries_on_hand_built_ranks():
    # N = 20: ranks are k/20. Boundaries: clean needs r_clip <= 0.8 and r_susp >= 0.2 (inclusive);
    # suspect needs r_clip > 0.9 or r_susp < 0.1 (strict).
    r_clip = torch.tensor([0.80, 0.85, 0.90, 0.95, 0.50, 0.50, 0.50, 0.50], dtype=torch.float64)
    r_susp = torch.tensor([0.20, 0.50, 0.50, 0.50, 0.15, 0.10, 0.05, 0.20], dtype=torch.float64)
    clean, suspect = split_masks(r_clip, r_susp, 0.2, 0.1)
    assert clean.tolist() == [True, False, False, False, False, False, False, True]
    assert suspect.tolist() == [False, False, False, True, False, False, True, False]


def test_auto_sigma_finds_the_shortcut_share_and_falls_back_without_one():
    g = torch.Generator().manual_seed(0)
    clean = torch.exp(torch.randn(900, generator=g) * 0.8 - 0.7)      # NLL around 0.5
    poison = torch.exp(torch.randn(100, generator=g) * 0.5 - 11.0)    # NLL around 2e-5
    choice = auto_sigma(torch.cat([clean, poison]), fixed=(0.2, 0.1), gap=0.1, bounds=(0.002, 0.3))
    assert choice.source == "auto"
    assert choice.sigma2 == pytest.approx(0.1, abs=0.01) and choice.sigma1 == pytest.approx(choice.sigma2 + 0.1)
    choice = auto_sigma(clean, fixed=(0.2, 0.1), gap=0.1, bounds=(0.002, 0.3))
    assert (choice.sigma1, choice.sigma2) == (0.2, 0.1) and choice.source.startswith("fixed (auto fell back")


def test_auto_sigma_suspect_cap_bounds_sigma2_only():
    g = torch.Generator().manual_seed(0)
    clean = torch.exp(torch.randn(750, generator=g) * 0.8 - 0.7)
    poison = torch.exp(torch.randn(250, generator=g) * 0.5 - 11.0)    # a 25% low mode
    nll = torch.cat([clean, poison])
    free = auto_sigma(nll, fixed=(0.2, 0.1), gap=0.1, bounds=(0.002, 0.3))
    capped = auto_sigma(nll, fixed=(0.2, 0.1), gap=0.1, bounds=(0.002, 0.3), suspect_cap=0.1)
    assert free.sigma2 == pytest.approx(0.25, abs=0.01)
    assert capped.sigma1 == free.sigma1 and capped.sigma2 == 0.1 and capped.details["suspect_cap"] == 0.1
    # a share below the cap is kept as estimated
    few = auto_sigma(torch.cat([clean, poison[:50]]), fixed=(0.2, 0.1), gap=0.1, bounds=(0.002, 0.3), suspect_cap=0.1)
    assert few.sigma2 == pytest.approx(50 / 800, abs=0.01)


def test_auto_sigma_capped_clamps_a_share_above_the_bound_uncapped_falls_back():
    g = torch.Generator().manual_seed(0)
    clean = torch.exp(torch.randn(650, generator=g) * 0.8 - 0.7)
    poison = torch.exp(torch.randn(350, generator=g) * 0.5 - 11.0)    # a clear 35% low mode, above the 0.3 bound
    nll = torch.cat([clean, poison])
    free = auto_sigma(nll, fixed=(0.2, 0.1), gap=0.1, bounds=(0.002, 0.3))
    assert (free.sigma1, free.sigma2) == (0.2, 0.1) and "outside [0.002, 0.3]" in free.source
    capped = auto_sigma(nll, fixed=(0.2, 0.1), gap=0.1, bounds=(0.002, 0.3), suspect_cap=0.1)
    assert capped.source == "auto" and capped.details["clamped_from"] == pytest.approx(0.35, abs=0.01)
    assert capped.sigma1 == pytest.approx(0.4) and capped.sigma2 == 0.1
    # what the clamp is for: the fixed sigma1 lets part of the low mode into the clean part, the clamped one does not
    r_susp = rank_normalize(nll)
    assert bool((r_susp[650:] >= free.sigma1).any()) and not bool((r_susp[650:] >= capped.sigma1).any())
    # a share below the lower bound still falls back, capped or not
    scarce = auto_sigma(torch.cat([clean, poison[:1]]), fixed=(0.2, 0.1), gap=0.1, bounds=(0.002, 0.3), suspect_cap=0.1)
    assert scarce.source.startswith("fixed (auto fell back")


def test_results_of_defenses_using_the_split_are_keyed_on_its_revision(monkeypatch):
    from cgd_defense.defenses import cgd_split
    from cgd_defense.registry import create_defense

    users = [create_defense("cgd"), create_defense("fp", clean_source="cgd")]
    others = [create_defense("fp", clean_source="oracle"), create_defense("abl")]
    assert all(d.code_revision() == {"cgd_split_revision": cgd_split.SPLIT_REVISION} for d in users)
    assert all(d.code_revision() == {} for d in others)
    monkeypatch.setattr(cgd_split, "SPLIT_REVISION", cgd_split.SPLIT_REVISION + 1)
    assert all(d.code_revision() == {"cgd_split_revision": cgd_split.SPLIT_REVISION} for d in users)


# ---------------------------------------------------------------------------------------------- balancing

def test_class_balancing_counts():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 1 + [3] * 4)
    clean = torch.ones(13, dtype=torch.bool)
    clean[9:] = False  # class 3 has no clean sample: it stays absent
    for mode in ("resample", "top_up"):
        idx = balance_clean_indices(clean, labels, mode, seed=0)
        assert torch.bincount(labels[idx], minlength=4).tolist() == [5, 5, 5, 0]
        assert clean[idx].all()
        assert sorted(idx[labels[idx] == 0].tolist()) == [0, 1, 2, 3, 4]  # the largest class kept once
    top_up = balance_clean_indices(clean, labels, "top_up", seed=0)
    assert set(top_up.tolist()) == set(range(9))  # no clean sample dropped
    assert balance_clean_indices(clean, labels, "none", seed=0).tolist() == list(range(9))


# ---------------------------------------------------------------------------------------------- losses

def test_distillation_is_t_squared_kl_teacher_to_student():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [1.0, -1.0, 0.0]])
    for t in (1.0, 3.0):
        p, q = F.softmax(teacher / t, 1), F.softmax(student / t, 1)
        expected = t ** 2 * (p * (p.log() - q.log())).sum(1).mean()
        reverse = t ** 2 * (q * (q.log() - p.log())).sum(1).mean()
        got = distillation_term(student, teacher, t)
        assert got == pytest.approx(float(expected), rel=1e-5) and got > 0
        assert abs(float(got) - float(reverse)) > 1e-3  # the direction matters, and it is KL(teacher || student)
    assert distillation_term(teacher, teacher, 3.0) == pytest.approx(0.0, abs=1e-6)


def test_unlearning_term_descends_on_the_given_label_and_is_bounded():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    p_before = F.softmax(logits, 1).gather(1, labels.view(-1, 1)).detach()
    (unlearning_term(logits, labels) * 0.025).backward()
    with torch.no_grad():
        p_after = F.softmax(logits - 10 * logits.grad, 1).gather(1, labels.view(-1, 1))
    assert (p_after < p_before).all()
    hopeless = torch.tensor([[-100.0, 100.0]])
    assert unlearning_term(hopeless, torch.tensor([0])) == pytest.approx(np.log(1e-6), rel=1e-4)


def test_cgd_loss_averages_each_term_over_its_own_rows_and_ignores_rest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    teacher = torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    roles = torch.tensor([ROLE_CLEAN, ROLE_CLEAN, ROLE_SUSPECT, ROLE_SUSPECT, ROLE_REST, ROLE_REST])
    a, t, b = 0.5, 3.0, 0.25
    loss = cgd_loss(logits, labels, roles, teacher, a, t, b)
    expected = F.cross_entropy(logits[:2], labels[:2]) + a * distillation_term(logits[2:4], teacher[2:4], t) \
        + b * unlearning_term(logits[2:4], labels[2:4])
    assert loss == pytest.approx(float(expected), rel=1e-6)
    changed = logits.clone()
    changed[4:] += 5.0  # "rest" rows: forward only, no loss
    assert cgd_loss(changed, labels, roles, teacher, a, t, b) == pytest.approx(float(loss), rel=1e-6)
    doubled = [0, 1, 2, 3, 2, 3]  # the suspects twice: per-subset means are unchanged
    assert cgd_loss(logits[doubled], labels[doubled], roles[doubled], teacher[doubled], a, t, b) \
        == pytest.approx(float(loss), rel=1e-6)
    rest_only = torch.randn(3, 4, requires_grad=True)
    out = cgd_loss(rest_only, labels[:3], torch.full((3,), ROLE_REST), teacher[:3], a, t, b)
    out.backward()
    assert float(out.detach()) == 0.0 and torch.equal(rest_only.grad, torch.zeros(3, 4))


def test_fitted_temperature_recovers_the_generating_scale():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(4000, 5, generator=g) * 0.3
    labels = torch.multinomial(F.softmax(cos * 40.0, 1), 1, generator=g).squeeze(1)
    assert fit_temperature_scale(cos, labels) == pytest.approx(40.0, rel=0.15)


# ---------------------------------------------------------------------------------------------- params

def test_reference_variant_carries_the_authors_constants():
    p = CGD(variant="reference").get_params()
    assert {k: p[k] for k in ("clip_calibration", "suspicious_scoring", "suspicious_repeats", "suspicious_epochs",
                              "suspicious_lr", "suspicious_weight_decay", "suspicious_batch_size", "sigma_mode",
                              "sigma1", "sigma2", "balance", "retrain_epochs", "retrain_lr", "retrain_momentum",
                              "retrain_schedule", "retrain_weight_decay", "retrain_batch_size",
                              "retrain_max_iters_per_epoch", "alpha", "temperature", "beta",
                              "early_stop_tolerance")} == {
        "clip_calibration": "cosine", "suspicious_scoring": "in_sample", "suspicious_repeats": 3,
        "suspicious_epochs": 5, "suspicious_lr": 3e-4, "suspicious_weight_decay": 5e-4, "suspicious_batch_size": 256,
        "sigma_mode": "fixed", "sigma1": 0.2, "sigma2": 0.1, "balance": "resample", "retrain_epochs": 10,
        "retrain_lr": 0.01, "retrain_momentum": 0.0, "retrain_schedule": "constant", "retrain_weight_decay": 5e-4,
        "retrain_batch_size": 256, "retrain_max_iters_per_epoch": 200, "alpha": 0.0005, "temperature": 3.0,
        "beta": 0.025, "early_stop_tolerance": 1.0}
    assert CGD(variant="reference", sigma_mode="auto").get_params()["sigma_mode"] == "auto"  # explicit wins
    assert CGD().get_params()["variant"] == "improved"
    with pytest.raises(ConfigError, match="field 'sigma2': must not exceed sigma1"):
        CGD(sigma1=0.05).params
    with pytest.raises(ConfigError, match="'variant' must be one of"):
        CGD(variant="faithful").params


# ---------------------------------------------------------------------------------------------- the split on data

def toy_poisoned(n_per_class=40, size=16, n_poison=12, seed=0) -> PoisonedData:
    """3 classes told apart by colour channel; poisons get a white corner patch and label 0."""
    g = torch.Generator().manual_seed(seed)
    true = torch.arange(3).repeat_interleave(n_per_class)
    images = torch.randint(0, 80, (len(true), 3, size, size), dtype=torch.uint8, generator=g)
    for c in range(3):
        images[true == c, c] += 120
    candidates = torch.nonzero(true != 0).flatten()
    poison_idx = candidates[torch.randperm(len(candidates), generator=g)[:n_poison]]
    images[poison_idx, :, -3:, -3:] = 255
    given = true.clone()
    given[poison_idx] = 0
    mask = torch.zeros(len(true), dtype=torch.bool)
    mask[poison_idx] = True
    return PoisonedData(images, given, true, mask, torch.zeros_like(mask), ["r", "g", "b"], "toy-badnets", 0)


def fake_clip_api(calls: list):
    """A clean zero-shot 'CLIP' that reads the colour channel: cosines in [0.2, 0.3]."""
    def load_clip(spec, **kwargs):
        calls.append(("load", spec))
        return SimpleNamespace(logit_scale=60.0, source={"label": "fake CLIP"}, identity="fake-weights")

    def zero_shot_logits(clip, images, dataset, classes, templates="reference", cache=None):
        calls.append(("score", len(images), templates))
        return 0.2 + 0.1 * images.float().mean((2, 3)) / 255

    return SimpleNamespace(load_clip=load_clip, zero_shot_logits=zero_shot_logits)


@pytest.fixture
def fake_clip(monkeypatch):
    calls: list = []
    monkeypatch.setattr(cgd_module, "_clip_api", lambda: fake_clip_api(calls))
    return calls


def make_context(tmp_path) -> DefenseContext:
    return DefenseContext(dataset="cifar10", classes=["r", "g", "b"], preset=get_preset("smoke"),
                          cache=Cache(tmp_path / "cache"), seed=0, device="cpu", clip="fake:clip")


TINY = {"suspicious_epochs": 2, "suspicious_batch_size": 32, "suspicious_repeats": 1,
        "retrain_epochs": 2, "retrain_batch_size": 32}


def test_split_reads_only_the_defender_view_and_finds_the_poisons(fake_clip, tmp_path):
    data = toy_poisoned()
    view = data.defender_view()
    assert type(view) is ImageData and not hasattr(view, "poison_mask")
    context = make_context(tmp_path)
    split = CGD(variant="reference", **TINY).split(view, context)
    assert torch.equal(split.suspect & data.poison_mask, data.poison_mask)  # every poison flagged (CLIP disagrees)
    assert not (split.clean & data.poison_mask).any()
    assert split.info["clip_source"] == "fake CLIP" and split.info["thresholds"]["sigma1"] == 0.2
    assert split.info["clip_info"]["identity"] == "fake-weights" and split.info["clip_info"]["teacher_scale"] == 1.0
    assert set(split.scores) == {"clip_nll", "suspicious_neg_nll", "combined"}
    assert set(context.stage_times) == {"clip_scoring", "suspicious_training"}
    again = CGD(variant="reference", **TINY).split(view, context)  # suspicious scores come from the cache
    assert any(h.startswith("cgd_suspicious/") for h in context.cache.hits)
    assert torch.equal(again.clean, split.clean) and torch.equal(again.suspect, split.suspect)


def test_fit_retrains_a_copy_and_reports(fake_clip, tmp_path):
    data = toy_poisoned()
    val = toy_poisoned(n_per_class=10, n_poison=3, seed=1)
    torch.manual_seed(0)
    model = Classifier(create_model("fastnet_small", 3), (0.5,) * 3, (0.25,) * 3, arch="fastnet_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    context = make_context(tmp_path)
    defense = CGD(variant="improved", suspicious_folds=2, **TINY).fit(model, data.defender_view(),
                                                                      val_set=val.defender_view(), context=context)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model was modified"
    assert any(not torch.equal(before[k], v) for k, v in defense.model_.state_dict().items())
    info = defense.info_
    assert set(context.stage_times) == {"clip_scoring", "suspicious_training", "retraining"}
    assert set(defense.stage_work(len(data))) == set(context.stage_times)
    assert info["pool_size"] == info["n_clean_balanced"] + info["n_suspect"] + info["n_rest"]
    assert info["early_stopping"]["n_used"] == 30 - 3  # val samples whose given label CLIP agrees with
    assert info["teacher_scale"] == 60.0 and info["variant"] == "improved"
    assert ("score", 30, "reference") in fake_clip  # CLIP scored the validation split too


class IndexedPredictor(nn.Module):
    """Predicts `labels[i]` for image i (i encoded in pixel 0), except the first `wrong` images."""

    def __init__(self, labels):
        super().__init__()
        self.labels = labels
        self.register_buffer("wrong", torch.tensor(0))

    def forward(self, x):
        i = (x[:, 0, 0, 0] * 255).round().long()
        pred = torch.where(i < self.wrong, (self.labels[i] + 1) % 3, self.labels[i])
        return F.one_hot(pred, 3).float()


def test_early_stopping_restores_the_previous_epoch_on_a_one_point_drop(tmp_path):
    n = 210
    labels = torch.arange(n) % 3
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    val = ImageData(images, labels, ["a", "b", "c"])
    cos = F.one_hot(labels, 3).float()
    cos[:10] = F.one_hot((labels[:10] + 2) % 3, 3).float()  # CLIP disagrees with 10 given labels: not used
    model = IndexedPredictor(labels)
    stop = ValidationAccuracyStop(model, val, cos, 1.0, make_context(tmp_path), "fp32")
    decisions = []
    # wrong among the 200 used: 8, 4 (best, 98%), 5 (-0.5 point: go on), 6 (-1 point: stop)
    for epoch, wrong in enumerate([18, 14, 15, 16], start=1):
        model.wrong.fill_(wrong)
        decisions.append(stop(epoch, model))
    assert decisions == [False, False, False, True]
    assert int(model.wrong) == 15  # the weights of epoch 3, the last that did not stop (not the best, epoch 2)
    report = stop.report()
    assert report["stopped_at_epoch"] == 4 and report["n_used"] == 200 and report["kept_epoch"] == 3
    assert report["val_acc_per_epoch"] == [0.96, 0.98, 0.975, 0.97]


# ---------------------------------------------------------------------------------------------- outputs

def test_entropy_map_and_split_file_round_trip(tmp_path):
    from cgd_defense.cli import main

    g = torch.Generator().manual_seed(0)
    n = 300
    poison = torch.zeros(n, dtype=torch.bool)
    poison[:30] = True
    scores = {"clip_nll": torch.rand(n, generator=g, dtype=torch.float64) + poison * 2.0,
              "suspicious_neg_nll": -torch.rand(n, generator=g, dtype=torch.float64) + poison * 1.0}
    r_clip, r_susp = rank_normalize(scores["clip_nll"]), rank_normalize(-scores["suspicious_neg_nll"])
    clean, suspect = split_masks(r_clip, r_susp, 0.2, 0.1)
    info = {"variant": "reference", "clip_source": "stand-in CLIP",
            "thresholds": {"sigma1": 0.2, "sigma2": 0.1, "source": "fixed"}}
    split = {"clean": clean, "suspect": suspect, "scores": scores, "info": info}
    gt = {"poison_mask": poison, "cross_mask": torch.zeros(n, dtype=torch.bool), "clean_label": False,
          "attack": "badnets"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"defense": "cgd", "split": split, "ground_truth": gt}, run_dir / "split.pt")
    main(["cgd", "map", str(run_dir)])
    png = run_dir / "entropy_map.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    payload = {"clean_indices": torch.nonzero(clean).flatten(), "scores": scores, "info": info}
    import json

    loaded = json.loads(write_split_file(payload, tmp_path / "split.json").read_text())
    assert loaded["clean_indices"] == payload["clean_indices"].tolist() and len(loaded["scores"]["clip_nll"]) == n
    pt = torch.load(write_split_file(payload, tmp_path / "split.pt"), weights_only=True)
    assert torch.equal(pt["clean_indices"], payload["clean_indices"])


def test_stage_work_counts_k_fold_training_and_the_retraining_cap():
    n = 10_000
    # 3 folds train on 2/3 of the data each: 2 passes per epoch; 2 repeats x 5 epochs
    kfold = CGD(variant="improved", suspicious_folds=3, suspicious_repeats=2, suspicious_epochs=5).stage_work(n)
    assert kfold["suspicious_training"] == 2 * 5 * 2 * n
    in_sample = CGD(variant="reference", suspicious_epochs=5).stage_work(n)  # 3 repeats, all of the data
    assert in_sample["suspicious_training"] == 3 * 5 * n
    # 200 batches of 256 per epoch at most: 51,200 samples, fewer than a 60,000-sample set
    capped = CGD(retrain_epochs=4).stage_work(60_000)["retraining"]
    assert capped == 4 * 200 * 256 and CGD(retrain_epochs=4).stage_work(n)["retraining"] == 4 * n
    assert CGD().stage_work(n)["clip_scoring"] == CGD(retrain_epochs=1).stage_work(n)["clip_scoring"] == n
