"""Each definition of leaderboard/METRICS.md on its hand-built case, computed by the harness code
the leaderboard uses (metrics.py, trigger_test_set, the table aggregation)."""
import math
import re

import pytest
import torch

from cgd_defense.attacks.poison import trigger_test_set
from cgd_defense.config import PROJECT_ROOT
from cgd_defense.data import ImageData
from cgd_defense.harness.metrics import (attack_success_rate, clean_accuracy, defense_effectiveness_rating,
                                         robust_accuracy, split_metrics)
from cgd_defense.leaderboard import tables
from cgd_defense.registry import create_attack

METRICS_MD = (PROJECT_ROOT / "leaderboard" / "METRICS.md").read_text()


def one_hot(preds, c=3):
    return torch.nn.functional.one_hot(torch.tensor(preds), c).float()


def documented(name: str) -> float:
    """The value METRICS.md's worked example states for `name` (e.g. '**CA = 4/5 = 0.8**')."""
    match = re.search(r"\*\*" + re.escape(name) + r" = [^*]*?(-?[0-9.]+)\*\*", METRICS_MD.replace("\n", " "))
    assert match, f"METRICS.md states no value for {name}"
    return float(match.group(1))


def test_ca_as_documented():
    assert clean_accuracy(one_hot([0, 1, 2, 1, 0]), torch.tensor([0, 1, 2, 1, 1])) == documented("CA") == 0.8


def test_asr_denominator_is_the_triggered_images_not_of_the_target_class():
    images = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    test = ImageData(images, torch.tensor([0, 1, 2, 1, 2]), ["a", "b", "c"])
    attack = create_attack("badnets", **{"poisoning.target": 0})
    triggered = trigger_test_set(attack, test)
    assert triggered.true_labels.tolist() == [1, 2, 1, 2]  # the target-class image is not in T
    assert triggered.attack_labels.tolist() == [0, 0, 0, 0]
    logits = one_hot([0, 2, 0, 1])
    assert attack_success_rate(logits, triggered.attack_labels) == documented("ASR") == 0.5
    assert robust_accuracy(logits, triggered.true_labels) == documented("RA") == 0.25


def test_all_to_all_triggered_set_keeps_images_whose_label_moves():
    test = ImageData(torch.zeros(6, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    triggered = trigger_test_set(create_attack("badnets-all2all"), test)
    assert len(triggered.true_labels) == 6  # y -> y + 1 mod C moves every label
    assert torch.equal(triggered.attack_labels, (triggered.true_labels + 1) % 3)


def test_der_as_documented_and_clipped():
    assert math.isclose(defense_effectiveness_rating(0.90, 0.95, 0.88, 0.01), documented("DER"))
    assert defense_effectiveness_rating(0.90, 0.10, 0.95, 0.30) == 0.5  # ASR rise and CA gain count as zero


def test_split_metrics_as_documented():
    poison = torch.zeros(10, dtype=torch.bool)
    poison[[0, 1]] = True
    suspect = torch.zeros(10, dtype=torch.bool)
    suspect[[0, 2]] = True
    clean = torch.zeros(10, dtype=torch.bool)
    clean[[1, 3, 4, 5]] = True
    m = split_metrics(suspect, clean, poison, {"combined": torch.tensor([9, 8, 7, 1, 2, 3, 4, 5, 6, 0.0])})
    assert m["suspect_tpr"] == documented("TPR")
    assert m["suspect_fpr"] == documented("FPR")
    assert m["clean_part_poison_rate"] == documented("poison in the clean part")
    assert m["auroc_combined"] == documented("AUROC")
    row = tables.flat_row({"grid": "g", "job_key": "k", "status": "done", "dataset": "d", "preset": "p",
                           "attack": "a", "attack_label": "a", "defense": "x", "defense_label": "x", "seed": 0,
                           "split": m})
    assert row["split_suspect_fraction"] == documented("flagged suspect")
    assert row["split_auroc"] == 1.0 and row["split_auroc_score"] == "auroc_combined"


def test_split_metrics_on_clean_data_and_auroc_ties():
    nothing = torch.zeros(4, dtype=torch.bool)
    m = split_metrics(torch.tensor([True, False, False, False]), ~nothing, nothing, {"s": torch.arange(4.0)})
    assert math.isnan(m["suspect_tpr"]) and m["suspect_fpr"] == 0.25 and math.isnan(m["auroc_s"])
    poison = torch.tensor([True, False, False, False])
    tied = split_metrics(nothing, nothing, poison, {"s": torch.tensor([1.0, 1.0, 0.0, 0.0])})
    assert tied["auroc_s"] == pytest.approx((0.5 + 1 + 1) / 3)  # a tie with one clean sample counts one half


def test_seed_aggregation_is_mean_and_sample_std():
    s = tables.stat([{"v": 0.90}, {"v": 0.92}, {"v": None}], "v")
    assert s.n == 2 and s.mean == pytest.approx(0.91) and s.std == pytest.approx(0.0141421, rel=1e-4)
    assert s.fmt() == "91.00 ± 1.41" and tables.stat([{"v": 0.5}], "v").fmt() == "50.00"
