"""Where a clean-data defense (FP, NAD, ANP, I-BAU) gets its "trusted" clean set.

These defenses assume the defender holds a small clean set. The CGD paper's second claim is that
CGD's clean split can stand in for it, so that they work on poisoned data alone. `clean_source`
picks what the defense receives; it sees nothing else (the harness's `val_set` goes only to CGD's
own split, which may calibrate CLIP on it, never to the clean-data defense):

- `oracle`: `fraction` of the training set drawn from truly clean samples by the harness
  (BackdoorBench's 5%, `utils/choose_index.py`); the benchmark's reference setting.
- `cgd`: exactly the samples CGD's split labels clean (`split.clean`), as in the paper.
- `random`: as many samples as the oracle would get, drawn (seeded) from the poisoned training set:
  the naive baseline that shows why the split matters.

Schedules are counted in passes over a reference set of the oracle's size, so every source gets
the same number of optimisation steps: sources differ in which samples they hold, not in compute
(CGD's clean part is usually many times larger than 5% of the data).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from ..config import StrictModel
from ..data.datasets import ImageData
from ..errors import CGDError
from ..harness.cache import tensor_digest
from ..harness.trainer import TrainConfig

CleanSource = Literal["oracle", "cgd", "random"]

# Offset of the `random` source's seed from the run seed, so it never shares a stream with the
# harness's oracle draw.
_RANDOM_SOURCE_SEED_OFFSET = 104_729


class CleanDataParams(StrictModel):
    """The parameters every clean-data defense shares."""

    clean_source: CleanSource = Field("oracle", description="oracle | cgd | random (see clean_source.py)")
    fraction: float = Field(0.05, gt=0, lt=1, description="oracle/random: share of the training set (BackdoorBench 5%)")
    cgd_params: dict[str, Any] = Field(default_factory=dict, description="cgd: options passed to the CGD defense")


@dataclass
class CleanData:
    """The clean set a defense received: indices into the training set, the samples themselves,
    and the size that schedules are counted in."""

    source: str
    indices: torch.Tensor
    data: ImageData
    n_reference: int
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def steps(self, epochs: float, batch_size: int) -> int:
        """Optimisation steps for `epochs` passes over a reference-sized clean set."""
        return max(1, math.ceil(epochs * self.n_reference / batch_size))

    def train_config(self, base: TrainConfig, *, epochs: float, lr: float, batch_size: int) -> TrainConfig:
        """The preset's recipe (optimizer, augmentation, precision) fine-tuning for `epochs` reference
        passes at `lr` with BackdoorBench's cosine schedule, whatever the number of samples held."""
        steps_per_epoch = math.ceil(len(self) / batch_size)
        return TrainConfig(**{**base.model_dump(), "epochs": self.steps(epochs, batch_size) / steps_per_epoch,
                              "lr": lr, "batch_size": batch_size, "schedule": "cosine", "warmup": 0.0,
                              "max_iters_per_epoch": None})


def reference_size(n_train: int, fraction: float) -> int:
    """The harness's oracle size (`fraction` of the training set), which `random` matches."""
    return max(1, int(round(fraction * n_train)))


def _cgd_clean_indices(train_set: ImageData, val_set: ImageData | None, context,
                       cgd_params: dict) -> tuple[torch.Tensor, dict]:
    try:
        from .cgd import CGD
    except ImportError as exc:
        raise CGDError(f"clean_source=cgd needs the CGD defense (cgd_defense.defenses.cgd), which cannot be "
                       f"imported: {exc}") from None
    from ..registry import defense_params  # deferred: the registry imports every defense module

    # registry defaults < the preset's changes < cgd_params, exactly as a `cgd` run would resolve them
    cgd = CGD(**defense_params("cgd", getattr(context.preset, "name", None), **cgd_params))
    split = cgd.split(train_set, context, val_set=val_set)
    clean = torch.as_tensor(split.clean, dtype=torch.bool)
    if clean.shape != (len(train_set),):
        raise CGDError(f"CGD's split has {tuple(clean.shape)} clean flags for {len(train_set)} training samples")
    indices = torch.nonzero(clean).flatten()
    return indices, {"cgd_params": cgd.get_params(), "cgd_split_info": dict(split.info)}


def resolve_clean_data(params: CleanDataParams, train_set: ImageData, context, defense: str, *,
                       val_set: ImageData | None = None) -> CleanData:
    """The clean set `clean_source` gives a defense, with its provenance for result.json: the
    source, the number of samples, and their poison rate (harness-held ground truth, reported only)."""
    n_ref = reference_size(len(train_set), params.fraction)
    extra: dict[str, Any] = {}
    if params.clean_source == "oracle":
        if context.oracle_clean_subset is None:
            raise CGDError(f"defense '{defense}': clean_source=oracle needs the harness's oracle clean subset, which "
                           f"only the benchmark harness provides; use clean_source=cgd or random on your own data")
        indices, _ = context.oracle_clean_subset(params.fraction)
        indices = torch.as_tensor(indices, dtype=torch.long)
    elif params.clean_source == "cgd":
        indices, extra = _cgd_clean_indices(train_set, val_set, context, params.cgd_params)
    else:
        g = torch.Generator().manual_seed(context.seed + _RANDOM_SOURCE_SEED_OFFSET)
        indices = torch.sort(torch.randperm(len(train_set), generator=g)[:n_ref]).values
    if len(indices) == 0:
        raise CGDError(f"defense '{defense}': clean_source={params.clean_source} gave no clean samples")
    report = context.report_poison_rate
    info = {"clean_source": params.clean_source, "n_clean_samples": len(indices), "n_reference": n_ref,
            "clean_poison_rate": report(indices) if report is not None else None,
            "clean_indices_sha256": tensor_digest(indices), **extra}
    return CleanData(params.clean_source, indices, train_set.subset(indices), n_ref, info)
