import math

import torch

from cgd_defense.harness.metrics import (attack_success_rate, clean_accuracy, defense_effectiveness_rating,
                                         robust_accuracy, split_metrics)


def _logits(preds, c=3):
    return torch.nn.functional.one_hot(torch.tensor(preds), c).float()


def test_ca_asr_ra_on_hand_built_case():
    # 5 clean test images, 4 correct
    assert clean_accuracy(_logits([0, 1, 2, 1, 0]), torch.tensor([0, 1, 2, 1, 1])) == 0.8
    # 4 triggered images (true labels 1, 2, 1, 2; target 0): 2 flipped to 0, 1 kept true, 1 other
    trig = _logits([0, 2, 0, 1])
    assert attack_success_rate(trig, torch.zeros(4, dtype=torch.long)) == 0.5
    assert robust_accuracy(trig, torch.tensor([1, 2, 1, 2])) == 0.25


def test_der_matches_backdoorbench_definition():
    # ASR 0.95 -> 0.01, CA 0.90 -> 0.88: (0.94 - 0.02 + 1) / 2
    assert math.isclose(defense_effectiveness_rating(0.90, 0.95, 0.88, 0.01), 0.96)
    # CA gain and ASR rise are clipped to zero
    assert defense_effectiveness_rating(0.90, 0.10, 0.95, 0.20) == 0.5


def test_split_metrics_hand_built():
    poison = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    suspect = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    clean = torch.tensor([0, 1, 0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    score = torch.tensor([9, 8, 7, 1, 2, 3, 4, 5, 6, 0], dtype=torch.float)
    m = split_metrics(suspect, clean, poison, {"combined": score})
    assert m["suspect_tpr"] == 0.5 and m["suspect_fpr"] == 1 / 8
    assert m["clean_part_poison_rate"] == 0.25 and m["n_rest"] == 4
    assert m["auroc_combined"] == 1.0
