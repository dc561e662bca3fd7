"""CGD's data split: the two per-sample scores, their ranks, the threshold rule, and class balancing.

Everything here follows the authors' code (binyxu/CGD; file:line references in
docs/reference/cgd_reference.md, sections 2-3) unless a docstring says otherwise.

- Scores: the negative log-likelihood of the *given* label under CLIP's zero-shot softmax (a weak
  but clean classifier: high when the image does not look like its label) and under a suspicious
  model trained on the poisoned set itself (low when the sample is learned through a shortcut,
  i.e. a trigger).
- Ranks: r = rank / N with rank 1 = lowest NLL (`visualization.py:233-237`).
- Rule (`cgd.py:324,334`): clean = r_clip <= 1 - sigma1 and r_susp >= sigma1; suspect =
  r_clip > 1 - sigma2 or r_susp < sigma2; the rest is neither. Equivalently suspect = combined >
  1 - sigma2 and clean = combined <= 1 - sigma1 with combined = max(r_clip, 1 - r_susp), which is
  why `combined_score` is the split's own score for AUROC.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..harness.trainer import TrainConfig, predict, train
from ..models import Classifier, create_model


def nll_of_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[i, y_i] in float64 (`visualization.py:230-231`)."""
    return F.cross_entropy(logits.double(), labels.long(), reduction="none")


# Bump when the split rule changes what it returns for the same parameters: cached results of every
# defense that uses the split (CGD, clean_source=cgd) are keyed on it, so they are recomputed.
# 1: auto_capped clamps a share above auto_sigma_max instead of falling back to the fixed sigmas.
SPLIT_REVISION = 1


def rank_normalize(values: torch.Tensor) -> torch.Tensor:
    """rank / N in float64 with rank 1 = the smallest value, as `np.argsort(np.argsort(x)) + 1`.
    Ties (e.g. NLLs saturated at exactly 0) are broken by sample order, deterministically; numpy's
    default quicksort in the reference breaks them arbitrarily."""
    n = len(values)
    order = torch.argsort(values, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(1, n + 1, dtype=torch.float64)
    return ranks / n


def combined_score(r_clip: torch.Tensor, r_susp: torch.Tensor) -> torch.Tensor:
    """max(r_clip, 1 - r_susp): higher = more suspicious; the split thresholds this one score."""
    return torch.maximum(r_clip, 1.0 - r_susp)


def split_masks(r_clip: torch.Tensor, r_susp: torch.Tensor, sigma1: float, sigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, suspect) boolean masks from the two rank vectors (`cgd.py:324,334`). With
    sigma2 <= sigma1 the two parts are disjoint."""
    clean = (r_clip <= 1 - sigma1) & (r_susp >= sigma1)
    suspect = (r_clip > 1 - sigma2) | (r_susp < sigma2)
    return clean, suspect


@dataclass
class SigmaChoice:
    sigma1: float
    sigma2: float
    source: str  # "fixed" | "auto" | "fixed (auto fell back: <why>)"
    details: dict = field(default_factory=dict)


def auto_sigma(suspicious_nll: torch.Tensor, fixed: tuple[float, float], gap: float, bounds: tuple[float, float],
               seed: int = 0, suspect_cap: float | None = None) -> SigmaChoice:
    """Choose sigma2 as the estimated share of shortcut-learned samples, sigma1 = sigma2 + gap.

    The reference hard-codes sigma2 = 0.1, which matches a 10% poison rate; at 1% it unlearns ten
    clean samples per poison and at 20% it misses half. Backdoored samples form their own mode at
    very low suspicious NLL (the trigger is the easiest feature in the set), so a two-component
    Gaussian mixture on log NLL estimates their share: the fraction of samples whose posterior for
    the low component exceeds 1/2. (A mixture on the ranks themselves cannot work: ranks are
    uniform by construction.) The fit is accepted only when it is clearly bimodal (BIC better than
    one component by 10, means >= 2 pooled SDs apart) and the share lies within `bounds`;
    otherwise the fixed values are used and the reason recorded.

    `suspect_cap` bounds sigma2 alone (sigma1 still follows the estimate): on clean data the log-NLL
    distribution has a long left tail of easy samples that the mixture also calls a mode (about 20%
    of CIFAR-10 at the quick preset), so an uncapped sigma2 unlearns every easy sample. Keeping the
    whole mode out of the clean part is what protects against clean-label attacks; unlearning it all
    is not needed, the samples between the two thresholds simply get no loss. With a cap, a share
    above the upper bound is clamped to it instead of falling back to the fixed values.
    """
    from sklearn.mixture import GaussianMixture

    x = torch.log(suspicious_nll.double().clamp_min(0) + 1e-6).numpy().reshape(-1, 1)
    fallback = lambda why, **d: SigmaChoice(fixed[0], fixed[1], f"fixed (auto fell back: {why})", d)  # noqa: E731
    if len(x) < 20 or float(np.std(x)) < 1e-6:
        return fallback("too few or constant scores")
    # reg_covar keeps a point mass of saturated NLLs (log(1e-6)) from collapsing to zero variance
    one = GaussianMixture(1, reg_covar=1e-2, random_state=seed).fit(x)
    start = np.quantile(x, [0.05, 0.5]).reshape(2, 1)  # a low and a central start: deterministic, one fit
    two = GaussianMixture(2, reg_covar=1e-2, means_init=start, random_state=seed).fit(x)
    means = two.means_.ravel()
    variances = two.covariances_.ravel()
    low = int(np.argmin(means))
    separation = float(abs(means[1] - means[0]) / math.sqrt(variances.mean()))
    share = float((two.predict_proba(x)[:, low] > 0.5).mean())
    bic_gain = float(one.bic(x) - two.bic(x))
    details = {"estimated_share": round(share, 5), "separation_sd": round(separation, 3),
               "bic_gain": round(bic_gain, 1), "low_mean_log_nll": round(float(means[low]), 3)}
    if bic_gain < 10 or separation < 2:
        return fallback("no clear low-NLL mode", **details)
    if share > bounds[1] and suspect_cap is not None:
        # Capped, sigma2 cannot follow the share anyway, so the upper bound only has to keep the clean
        # part from shrinking without limit. A clear low mode larger than the bound still has to stay
        # out of the clean part, which the fixed sigma1 does not ensure. SIG at the `cpu` preset: share
        # 0.314; the fixed sigma1 0.2 left 124 of 3,800 poisons in the clean part, the clamped 0.3 + gap
        # 0.1 leaves 1 (recomputed from that run's saved scores).
        details["clamped_from"] = round(share, 5)
        share = bounds[1]
    elif not bounds[0] <= share <= bounds[1]:
        return fallback(f"estimated share {share:.4f} outside [{bounds[0]}, {bounds[1]}]", **details)
    if suspect_cap is not None:
        details["suspect_cap"] = suspect_cap
    return SigmaChoice(min(share + gap, 0.5), share if suspect_cap is None else min(share, suspect_cap), "auto", details)


def balance_clean_indices(clean_mask: torch.Tensor, labels: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """Indices of the clean part, class-balanced by the *given* labels (the defender has no others).

    - "resample" (the reference, `visualization.py:249-259`): the largest class(es) kept once; every
      other class is redrawn with replacement to the largest count, so some originals may drop out.
    - "top_up": every clean sample kept once, each smaller class topped up with replacement to the
      largest count: the same balance without discarding clean data.
    - "none": the clean indices as they are.
    Classes with no clean sample stay absent, as in the reference.
    """
    clean_idx = torch.nonzero(clean_mask).flatten()
    if mode == "none" or len(clean_idx) == 0:
        return clean_idx
    g = torch.Generator().manual_seed(seed)
    given = labels[clean_idx]
    classes, counts = torch.unique(given, return_counts=True)
    largest = int(counts.max())
    parts = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        members = clean_idx[given == c]
        if n == largest:
            parts.append(members)
        elif mode == "resample":
            parts.append(members[torch.randint(0, n, (largest,), generator=g)])
        else:  # top_up
            parts.append(torch.cat([members, members[torch.randint(0, n, (largest - n,), generator=g)]]))
    return torch.cat(parts)


def optimizer_over_all_parameters(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The authors' optimizers decay every parameter (`torch.optim.Adam/SGD(model.parameters(),
    weight_decay=...)`, `utils/models.py:105-116`, `cgd.py:205`); the project trainer's default
    excludes BatchNorm and biases, so CGD builds its own."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)


def suspicious_logits(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, arch: str, mean, std,
                      cfg: TrainConfig, repeats: int, folds: int | None, seed: int, device=None) -> torch.Tensor:
    """Logits of fresh `arch` models trained on the poisoned set, averaged over `repeats`
    (`visualization.py:266-275`: raw logits averaged).

    folds=None: each model trains on all N samples and scores them in-sample, as the reference
    effectively does (its k-fold loop breaks after one fold trained on everything, `utils/models.py:71-94`).
    folds=k: a seeded k-fold: each sample is scored by the model that did not train on it.
    """
    n = len(labels)
    total = torch.zeros(n, num_classes, dtype=torch.float64)
    for r in range(repeats):
        run_seed = seed * 1000 + r
        if folds is None:
            parts = [(torch.arange(n), torch.arange(n))]
        else:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(run_seed))
            chunks = perm.chunk(folds)
            parts = [(torch.cat([c for j, c in enumerate(chunks) if j != f]), chunks[f]) for f in range(folds)]
        for f, (fit_idx, score_idx) in enumerate(parts):
            torch.manual_seed(run_seed * 100 + f)
            model = Classifier(create_model(arch, num_classes), mean, std, arch=arch)
            train(model, images, labels, cfg, seed=run_seed * 100 + f, indices=fit_idx, device=device,
                  optimizer=optimizer_over_all_parameters(model, cfg),
                  desc=f"cgd suspicious model {r + 1}/{repeats}" + (f" fold {f + 1}/{folds}" if folds else ""))
            total[score_idx] += predict(model, images[score_idx], device=device, precision=cfg.precision).double()
    return (total / repeats).float()
