"""The defense interface, following scikit-learn's estimator convention.

- Hyperparameters are keyword-only constructor arguments stored as given; `get_params()` is exactly
  what the results database stores; `clone()` rebuilds an unfitted copy.
- `fit(model, train_set, *, val_set, clean_subset, context) -> self` sets `model_` (the defended
  model, same architecture as the input: pruning masks weights in place), optionally `split_` (a
  `Split`, for defenses that separate the data) and `info_` (a JSON-able dict for result.json).
- `train_set` is the defender's view (images and given labels): ground truth never reaches a defense.
- Parameters are validated at fit time against `_parameter_constraints` (pydantic schema `Params`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
import torch.nn as nn

from ..config import StrictModel, unknown_name_error, validate_model
from ..data.datasets import ImageData
from ..harness.stages import timed_stage

ThreatModel = Literal["poisoned-data", "clean-subset", "model-only"]

_DEFENSES: dict[str, type["Defense"]] = {}


def register_defense(name: str):
    def deco(cls: type["Defense"]):
        if name in _DEFENSES:
            raise ValueError(f"defense '{name}' is already registered (by {_DEFENSES[name].__module__})")
        cls.name = name
        _DEFENSES[name] = cls
        return cls
    return deco


def registered_defenses() -> dict[str, type["Defense"]]:
    return dict(_DEFENSES)


def get_defense_class(name: str) -> type["Defense"]:
    if name not in _DEFENSES:
        raise unknown_name_error("defense", name, _DEFENSES)
    return _DEFENSES[name]


@dataclass
class Split:
    """A partition of the training set into clean / suspect / rest, with the scores behind it."""

    clean: torch.Tensor    # bool mask
    suspect: torch.Tensor  # bool mask
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # higher = more suspicious
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rest(self) -> torch.Tensor:
        return ~(self.clean | self.suspect)

    def to_payload(self) -> dict:
        return {"clean": self.clean, "suspect": self.suspect, "scores": self.scores, "info": self.info}

    @classmethod
    def from_payload(cls, p: dict) -> "Split":
        return cls(p["clean"], p["suspect"], dict(p["scores"]), dict(p["info"]))


@dataclass
class DefenseContext:
    """What the harness lends a defense besides data: where to cache, how to train, which device,
    the dataset's identity (class names for CLIP), the preset's training recipe and the seed."""

    dataset: str
    classes: list[str]
    preset: Any  # harness.presets.Preset
    cache: Any   # harness.cache.Cache
    seed: int = 0
    device: str | None = None
    clip: str | None = None
    artifact_dir: Any = None  # pathlib.Path where a defense may write figures (moved into the run folder)
    # Harness-held ground truth, lent only for the benchmark's `oracle` clean-data setting: returns
    # (indices into the training set, ImageData) of `fraction` of the training set drawn from truly
    # clean samples. Its use is recorded in result.json; no other defense path may call it.
    oracle_clean_subset: Callable[[float], tuple[torch.Tensor, ImageData]] | None = None
    # Ground-truth poison mask, for *reporting* the poison rate of what a defense received
    # (e.g. the clean subset a clean-data defense was fed); never for decisions.
    report_poison_rate: Callable[[torch.Tensor], float] | None = None
    stage_times: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str):
        """`with context.stage("name"): ...` times a stage of the defense into `stage_times` (what
        result.json reports as `defense.<name>`) and logs its start and end."""
        return timed_stage(self.stage_times, name, label=f"defense.{name}")


class Defense:
    name: ClassVar[str] = ""
    threat_model: ClassVar[ThreatModel] = "poisoned-data"

    class Params(StrictModel):
        pass

    def __init__(self, **params):
        self._params = dict(params)

    def get_params(self) -> dict:
        """Every parameter with its effective value (declared defaults filled in), JSON-ready."""
        return self.params.model_dump(mode="json")

    def set_params(self, **params) -> "Defense":
        self._params.update(params)
        return self

    def clone(self) -> "Defense":
        return type(self)(**copy.deepcopy(self._params))

    @property
    def params(self) -> StrictModel:
        """Validated parameters (raises ConfigError naming the defense and field)."""
        return validate_model(self.Params, self._params, f"defense '{self.name}'")

    def code_revision(self) -> dict:
        """Fields the harness adds to the key of this defense's cached result, changed by a code fix
        that alters what `fit` returns for the same parameters, so stale results are recomputed.
        Defenses that use CGD's split (CGD, clean_source=cgd) carry the split rule's revision."""
        if not self.uses_clip():
            return {}
        from .cgd_split import SPLIT_REVISION  # deferred: cgd_split imports the trainer

        return {"cgd_split_revision": SPLIT_REVISION}

    def stage_work(self, n_train: int) -> dict[str, float]:
        """How much work each stage `fit` times (`context.stage`) does under these parameters on
        `n_train` samples, in a unit proportional to its run time for a fixed model and dataset
        (samples passed through the model). Only the ratio between two settings of one defense means
        anything: bench/defense_cost.py scales a run measured at one preset to another preset's
        schedule with it. Empty for a defense that does not declare its stages' work."""
        return {}

    def uses_clip(self) -> bool:
        """Whether `fit` loads the run's CLIP (`context.clip`): every defense fed CGD's clean split
        does; CGD overrides this. The harness then keys its results on the CLIP's identity."""
        return getattr(self.params, "clean_source", None) == "cgd"

    def fit(self, model: nn.Module, train_set: ImageData, *, val_set: ImageData | None = None,
            clean_subset: ImageData | None = None, context: DefenseContext) -> "Defense":
        raise NotImplementedError(f"defense '{self.name}' does not implement fit()")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self._params.items()))
        return f"{type(self).__name__}({args})"
