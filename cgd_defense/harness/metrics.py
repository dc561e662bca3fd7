"""Evaluation metrics, as defined in leaderboard/METRICS.md.

- CA (clean accuracy): accuracy on the clean test set.
- ASR (attack success rate): fraction of triggered test images whose true label differs from the
  attacker's label (all-to-one: every non-target image) that are classified as the attacker's label.
- RA (robust accuracy): fraction of those same triggered images classified as their true label.
- DER (defense effectiveness rating, BackdoorBench, Wu et al. 2022):
  DER = (max(0, ASR_nd - ASR_d) - max(0, CA_nd - CA_d) + 1) / 2, from the no-defense run (nd) of the
  same attack and seed; 0.5 means no change, 1 means the backdoor removed at no accuracy cost.
"""
from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return int((logits.argmax(1) == labels).sum()) / len(labels)


def clean_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return accuracy(logits, labels)


def attack_success_rate(triggered_logits: torch.Tensor, attack_labels: torch.Tensor) -> float:
    return accuracy(triggered_logits, attack_labels)


def robust_accuracy(triggered_logits: torch.Tensor, true_labels: torch.Tensor) -> float:
    return accuracy(triggered_logits, true_labels)


def defense_effectiveness_rating(ca_nodefense: float, asr_nodefense: float, ca: float, asr: float) -> float:
    return (max(0.0, asr_nodefense - asr) - max(0.0, ca_nodefense - ca) + 1.0) / 2.0


def split_metrics(suspect: torch.Tensor, clean: torch.Tensor, poison_mask: torch.Tensor,
                  scores: dict[str, torch.Tensor] | None = None) -> dict:
    """Quality of a clean/suspect split against the ground-truth poison mask (which only the harness
    holds). `scores`: higher = more suspicious, for AUROC."""
    suspect, clean, poison = suspect.bool(), clean.bool(), poison_mask.bool()
    n_poison, n_clean_true = int(poison.sum()), int((~poison).sum())
    out = {
        "n_total": len(poison), "n_poison": n_poison,
        "n_clean_part": int(clean.sum()), "n_suspect_part": int(suspect.sum()),
        "n_rest": int((~clean & ~suspect).sum()),
        "suspect_tpr": float((suspect & poison).sum()) / n_poison if n_poison else float("nan"),
        "suspect_fpr": float((suspect & ~poison).sum()) / n_clean_true if n_clean_true else float("nan"),
        "clean_part_poison_rate": float((clean & poison).sum()) / max(int(clean.sum()), 1),
        "clean_part_poison_count": int((clean & poison).sum()),
    }
    for name, score in (scores or {}).items():
        out[f"auroc_{name}"] = (float(roc_auc_score(poison.numpy(), score.float().numpy()))
                                if 0 < n_poison < len(poison) else float("nan"))
    return out
