"""`cgd`: CLIP-Guided backdoor Defense (Xu et al., "CLIP-Guided Backdoor Defense through Entropy-Based
Poisoned Dataset Separation", ACM MM 2025; code binyxu/CGD, see docs/reference/cgd_reference.md).

1. Split the poisoned training set with two per-sample NLLs of the given label: CLIP's zero-shot
   prediction (a clean but weak classifier) and a suspicious model trained on the poisoned set
   (`cgd_split.py`).
2. Fine-tune a copy of the backdoored model: CE on the class-balanced clean part, distillation
   towards CLIP plus bounded unlearning on the suspects (`cgd_losses.py`).

`variant: reference` reproduces the authors' code; `variant: improved` (the default) changes the
settings listed in `VARIANT_DEFAULTS`, each a parameter of its own whose description says why.
Any of them can be set explicitly with either variant, for ablations.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..config import StrictModel
from ..errors import ConfigError
from ..data.datasets import ImageData, get_dataset_info
from ..harness.cache import atomic_write_bytes, atomic_write_text, tensor_digest
from ..harness.trainer import TrainConfig, predict, train
from .base import Defense, DefenseContext, Split, register_defense
from .cgd_losses import ROLE_CLEAN, ROLE_REST, ROLE_SUSPECT, CGDObjective, fit_temperature_scale
from .cgd_split import (auto_sigma, balance_clean_indices, combined_score, nll_of_labels, optimizer_over_all_parameters,
                        rank_normalize, split_masks, suspicious_logits, SigmaChoice)
from .entropy_map import draw_entropy_map, entropy_map_title

# The settings on which the two variants differ; a parameter given explicitly always wins.
VARIANT_DEFAULTS: dict[str, dict] = {
    "reference": {"clip_calibration": "cosine", "suspicious_scoring": "in_sample", "suspicious_repeats": 3,
                  "sigma_mode": "fixed", "balance": "resample", "retrain_momentum": 0.0,
                  "retrain_schedule": "constant", "alpha": 0.0005},
    "improved": {"clip_calibration": "logit_scale", "suspicious_scoring": "kfold", "suspicious_repeats": 1,
                 "sigma_mode": "auto_capped", "balance": "top_up", "retrain_momentum": 0.9,
                 "retrain_schedule": "cosine", "alpha": 0.01},
}

SUSPICIOUS_FORMAT = 1  # bump when the suspicious-score computation changes, to invalidate cached scores


def _clip_api():
    """The CLIP layer (`load_clip`, `zero_shot_logits`), imported on first use: importing the
    defense must stay cheap, and tests substitute a fake here."""
    from .. import clip

    return clip


def clip_provenance(clip, context: DefenseContext, p: "CGDParams", teacher_scale: float) -> dict:
    """Everything that says which CLIP judged the split and how it was read: the spec, where its
    weights came from ("stand-in CLIP" or "pretrained CLIP"), their identity (a sha256 or the
    open_clip tag), the prompts and the teacher's temperature; the leaderboard prints it."""
    from ..clip.zeroshot import prompts_for

    prompts = prompts_for(context.dataset, list(context.classes), p.templates)
    return {"spec": context.clip, "label": (clip.source or {}).get("label", "unknown CLIP"), "identity": clip.identity,
            "source": json.loads(json.dumps(clip.source or {}, default=str)), "templates": p.templates,
            "prompts": [per_class[0] for per_class in prompts], "prompts_per_class": len(prompts[0]),
            "calibration": p.clip_calibration, "teacher_scale": teacher_scale}


class CGDParams(StrictModel):
    variant: Literal["reference", "improved"] = Field(
        "improved", description="'reference' = the authors' code; 'improved' = the changes in VARIANT_DEFAULTS")
    # --- CLIP scores and teacher
    templates: Literal["reference", "ensemble"] = Field(
        "reference", description="prompts: the reference's single template per dataset, or CLIP's prompt ensemble")
    clip_calibration: Literal["cosine", "logit_scale", "fitted"] | None = Field(
        None, description="how CLIP cosines become the distillation teacher's logits. 'cosine' (reference): raw "
        "cosines; their softmax is nearly uniform (|delta| ~ 0.1), so the teacher carries almost no information. "
        "'logit_scale' (improved): cosines x the CLIP's own logit_scale, the scale it was trained to be read at. "
        "'fitted': a scale fitted on the validation split's given labels (temperature scaling). The split's CLIP "
        "NLL always uses raw cosines, as the reference: ranked by the scaled NLL, poisons scored lower AUROC on "
        "3 of 4 attacks (cifar10-mini, stand-in CLIP: badnets .829/.828, blended .917/.921, SIG .636/.687, "
        "WaNet .789/.795 scaled/raw).")
    # --- suspicious model
    suspicious_scoring: Literal["in_sample", "kfold"] | None = Field(
        None, description="'in_sample' (reference): scored by models trained on every sample; 'kfold' (improved): "
        "each sample scored by a model that never saw it, so only what generalises (a trigger) gives a low NLL, "
        "not memorisation of individual clean samples.")
    suspicious_folds: int = Field(3, ge=2, le=20, description="folds for suspicious_scoring='kfold'")
    suspicious_repeats: int | None = Field(
        None, ge=1, le=10, description="independent suspicious models whose logits are averaged (reference 3; "
        "improved 1, since k-fold already trains k models: 3 folds cost 2 full trainings)")
    suspicious_epochs: float = Field(5, gt=0, description="epochs per suspicious model (reference 5)")
    suspicious_lr: float = Field(3e-4, gt=0, description="Adam learning rate (reference 3e-4)")
    suspicious_weight_decay: float = Field(5e-4, ge=0, description="Adam L2 weight decay (reference 5e-4)")
    suspicious_batch_size: int = Field(256, ge=1, description="reference 256; no augmentation")
    # --- split
    sigma_mode: Literal["fixed", "auto", "auto_capped"] | None = Field(
        None, description="'fixed' (reference): sigma1/sigma2 as given; 'auto': sigma2 = the share of "
        "the low-NLL mode of the suspicious scores (2-component mixture), sigma1 = sigma2 + auto_sigma_gap, "
        "falling back to sigma1/sigma2 when the scores show no clear mode; the fixed 0.1 matches only a 10% "
        "poison rate; 'auto_capped' (improved): as auto, but sigma2 at most the given sigma2, so the whole low mode "
        "stays out of the clean part without all of it (easy clean samples too) being unlearned.")
    sigma1: float = Field(0.2, gt=0, lt=0.5, description="clean part: r_clip <= 1 - sigma1 and r_susp >= sigma1")
    sigma2: float = Field(0.1, gt=0, lt=0.5, validate_default=True, description="suspects: r_clip > 1 - sigma2 or r_susp < sigma2")
    auto_sigma_gap: float = Field(0.1, ge=0, lt=0.5, description="auto: sigma1 - sigma2, the buffer between parts")
    auto_sigma_min: float = Field(0.002, gt=0, lt=0.5, description="auto: smallest share accepted")
    auto_sigma_max: float = Field(0.3, gt=0, lt=0.5, validate_default=True,
                                  description="auto: largest share accepted; auto_capped clamps a larger one to it")
    balance: Literal["resample", "top_up", "none"] | None = Field(
        None, description="class balancing of the clean part by given label: 'resample' (reference) redraws each "
        "smaller class with replacement, dropping some originals; 'top_up' (improved) keeps every clean sample and "
        "adds duplicates")
    # --- retraining
    retrain_epochs: float = Field(10, gt=0, description="reference 10")
    retrain_lr: float = Field(0.01, gt=0, description="SGD learning rate (reference 0.01)")
    retrain_momentum: float | None = Field(
        None, ge=0, lt=1, description="SGD momentum: 0 in the reference (its yaml's momentum is never used); 0.9 "
        "(improved) with the cosine schedule, the usual fine-tuning recipe, for faster unlearning at the same lr")
    retrain_schedule: Literal["constant", "cosine"] | None = Field(
        None, description="learning-rate schedule: constant (reference; its yaml's CosineAnnealingLR is ignored) "
        "or cosine (improved): the late small steps repair clean accuracy after unlearning")
    retrain_weight_decay: float = Field(5e-4, ge=0, description="reference 5e-4, on every parameter")
    retrain_batch_size: int = Field(256, ge=1, description="reference 256")
    retrain_max_iters_per_epoch: int | None = Field(200, ge=1, description="reference: 200 batches per epoch")
    retrain_crop_padding: int = Field(4, ge=0, description="random-crop padding (BackdoorBench: 4; flips on CIFAR-10 only)")
    alpha: float | None = Field(
        None, ge=0, description="distillation weight (reference 0.0005: with alpha*T = 0.0015 against the "
        "unlearning's beta = 0.025 the teacher barely acts; improved 0.01 makes its pull comparable to the "
        "unlearning, which only pays off with a calibrated teacher)")
    temperature: float = Field(3.0, gt=0, description="distillation temperature T (reference 3)")
    beta: float = Field(0.025, ge=0, description="unlearning weight (reference 0.025)")
    early_stopping: bool = Field(True, description="stop when validation accuracy drops early_stop_tolerance points "
                                 "below its best and restore the previous epoch (the reference does this on test data)")
    early_stop_tolerance: float = Field(1.0, gt=0, description="percentage points (reference 1.0)")

    @model_validator(mode="before")
    @classmethod
    def _fill_variant_defaults(cls, data):
        if isinstance(data, dict):
            variant = data.get("variant", "improved")
            if variant in VARIANT_DEFAULTS:
                data = dict(data)
                for key, value in VARIANT_DEFAULTS[variant].items():
                    if data.get(key) is None:
                        data[key] = value
        return data

    @field_validator("sigma2")
    @classmethod
    def _sigma2_within_sigma1(cls, value: float, info: ValidationInfo) -> float:
        sigma1 = info.data.get("sigma1")
        if sigma1 is not None and value > sigma1:
            raise ValueError(f"must not exceed sigma1 ({sigma1}), or the clean and suspect parts would overlap")
        return value

    @field_validator("auto_sigma_max")
    @classmethod
    def _max_above_min(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("auto_sigma_min")
        if low is not None and value < low:
            raise ValueError(f"must not be below auto_sigma_min ({low})")
        return value


@register_defense("cgd")
class CGD(Defense):
    threat_model = "poisoned-data"
    Params = CGDParams

    def uses_clip(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------ split

    def split(self, train_set: ImageData, context: DefenseContext, *, val_set: ImageData | None = None) -> Split:
        """The clean / suspect / rest split of `train_set` (given labels only). `val_set` is needed
        only for clip_calibration='fitted'. Stage times go into `context.stage_times`."""
        return self._split(self.params, train_set, val_set, context)[0]

    def _clip_cosines(self, p: CGDParams, context: DefenseContext, *sets: ImageData):
        api = _clip_api()
        clip = api.load_clip(context.clip, dataset=context.dataset, data_root=context.extra.get("data_root"),
                             cache=context.cache, device=context.device)
        cosines = [api.zero_shot_logits(clip, s.images, context.dataset, context.classes, templates=p.templates,
                                        cache=context.cache) for s in sets]
        return clip, cosines

    def _teacher_scale(self, p: CGDParams, clip, val_cos: torch.Tensor | None, val_set: ImageData | None) -> float:
        if p.clip_calibration == "cosine":
            return 1.0
        if p.clip_calibration == "logit_scale":
            return float(clip.logit_scale)
        if val_cos is None:
            raise ConfigError("cgd: clip_calibration='fitted' needs the validation split (val_set)")
        return fit_temperature_scale(val_cos, val_set.labels)

    def _suspicious_logits(self, p: CGDParams, train_set: ImageData, context: DefenseContext) -> torch.Tensor:
        arch = context.preset.model
        info = get_dataset_info(context.dataset)
        cfg = TrainConfig(epochs=p.suspicious_epochs, batch_size=p.suspicious_batch_size, optimizer="adam",
                          lr=p.suspicious_lr, weight_decay=p.suspicious_weight_decay, schedule="constant",
                          augment=False, precision=context.preset.train.precision)
        folds = p.suspicious_folds if p.suspicious_scoring == "kfold" else None
        spec = {"images": tensor_digest(train_set.images), "labels": tensor_digest(train_set.labels),
                "dataset": context.dataset, "arch": arch, "train": cfg.model_dump(mode="json"),
                "repeats": p.suspicious_repeats, "folds": folds, "seed": context.seed, "format": SUSPICIOUS_FORMAT}

        def compute():
            return {"logits": suspicious_logits(
                train_set.images, train_set.labels, train_set.num_classes, arch=arch, mean=info.mean, std=info.std,
                cfg=cfg, repeats=p.suspicious_repeats, folds=folds, seed=context.seed, device=context.device)}

        return context.cache.get_or_compute("cgd_suspicious", spec, compute)["logits"]

    def _split(self, p: CGDParams, train_set: ImageData, val_set: ImageData | None, context: DefenseContext):
        with context.stage("clip_scoring"):
            clip, cosines = self._clip_cosines(p, context, train_set, *([val_set] if val_set is not None else []))
            train_cos, val_cos = cosines[0], (cosines[1] if val_set is not None else None)
            scale = self._teacher_scale(p, clip, val_cos, val_set)
            clip_nll = nll_of_labels(train_cos, train_set.labels)

        with context.stage("suspicious_training"):
            susp_nll = nll_of_labels(self._suspicious_logits(p, train_set, context), train_set.labels)

        if p.sigma_mode in ("auto", "auto_capped"):
            sigma = auto_sigma(susp_nll, (p.sigma1, p.sigma2), p.auto_sigma_gap, (p.auto_sigma_min, p.auto_sigma_max),
                               seed=context.seed, suspect_cap=p.sigma2 if p.sigma_mode == "auto_capped" else None)
        else:
            sigma = SigmaChoice(p.sigma1, p.sigma2, "fixed")
        r_clip, r_susp = rank_normalize(clip_nll), rank_normalize(susp_nll)
        clean, suspect = split_masks(r_clip, r_susp, sigma.sigma1, sigma.sigma2)
        source = getattr(clip, "source", {}) or {}
        split = Split(clean=clean, suspect=suspect,
                      scores={"clip_nll": clip_nll, "suspicious_neg_nll": -susp_nll,
                              "combined": combined_score(r_clip, r_susp)},
                      info={"variant": p.variant, "clip": context.clip, "clip_source": source.get("label", "unknown CLIP"),
                            "clip_info": clip_provenance(clip, context, p, scale),
                            "teacher_scale": scale, "thresholds": {"sigma1": sigma.sigma1, "sigma2": sigma.sigma2,
                                                                 "source": sigma.source, **sigma.details},
                            "n": len(train_set), "n_clean": int(clean.sum()), "n_suspect": int(suspect.sum()),
                            "n_rest": int((~clean & ~suspect).sum())})
        return split, train_cos * scale, val_cos

    # ------------------------------------------------------------------------------------------ fit

    def stage_work(self, n_train: int) -> dict[str, float]:
        p = self.params
        # k-fold scoring trains k models on (k-1)/k of the data each: k-1 passes over it per epoch.
        passes_per_epoch = p.suspicious_folds - 1 if p.suspicious_scoring == "kfold" else 1
        retrain_epoch = n_train if p.retrain_max_iters_per_epoch is None else \
            min(n_train, p.retrain_max_iters_per_epoch * p.retrain_batch_size)
        return {"clip_scoring": float(n_train),  # one CLIP pass over the data, whatever the schedule
                "suspicious_training": p.suspicious_repeats * p.suspicious_epochs * passes_per_epoch * n_train,
                "retraining": p.retrain_epochs * retrain_epoch}

    def fit(self, model, train_set: ImageData, *, val_set: ImageData | None = None, clean_subset=None,
            context: DefenseContext) -> "CGD":
        p = self.params
        split, teacher_logits, val_cos = self._split(p, train_set, val_set, context)

        with context.stage("retraining"):
            clean_pool = balance_clean_indices(split.clean, train_set.labels, p.balance, context.seed)
            roles = torch.full((len(train_set),), ROLE_REST, dtype=torch.long)
            roles[split.suspect] = ROLE_SUSPECT
            roles[split.clean] = ROLE_CLEAN
            # one shuffled pool: balanced clean indices, then every non-clean index once (`cgd.py:552-597`)
            pool = torch.cat([clean_pool, torch.nonzero(~split.clean).flatten()])
            cfg = TrainConfig(epochs=p.retrain_epochs, batch_size=p.retrain_batch_size, optimizer="sgd",
                              lr=p.retrain_lr, momentum=p.retrain_momentum, nesterov=False,
                              weight_decay=p.retrain_weight_decay, schedule=p.retrain_schedule, warmup=0.0,
                              augment=True, crop_padding=p.retrain_crop_padding, flip=context.dataset == "cifar10",
                              max_iters_per_epoch=p.retrain_max_iters_per_epoch,
                              precision=context.preset.train.precision)
            student = copy.deepcopy(model)
            stopper = None
            if p.early_stopping and val_set is not None:
                stopper = ValidationAccuracyStop(student, val_set, val_cos, p.early_stop_tolerance, context,
                                                 cfg.precision)
            result = train(student, train_set.images, train_set.labels, cfg, seed=context.seed, indices=pool,
                           loss_fn=CGDObjective(roles, teacher_logits, p.alpha, p.temperature, p.beta),
                           on_epoch_end=stopper, device=context.device, desc="cgd retraining",
                           optimizer=optimizer_over_all_parameters(student, cfg))

        self.split_ = split
        self.model_ = student.eval()
        if stopper is not None:
            stopping = stopper.report()
        else:
            stopping = "off (no validation split)" if p.early_stopping else "off"
        self.info_ = {**split.info, "n_clean_balanced": len(clean_pool), "pool_size": len(pool),
                      "epochs_run": result.epochs_run, "steps": result.steps, "history": result.history,
                      "early_stopping": stopping, "stage_times": dict(context.stage_times)}
        return self

    # ------------------------------------------------------------------------------------------ figure

    def draw_split_figure(self, split: Split, gt: dict, path) -> None:
        """The entropy map of `split`, coloured by the harness's ground truth `gt` (poison_mask,
        cross_mask, clean_label, attack): called by the harness after the run, never by `fit`."""
        poison = gt["poison_mask"].bool()
        draw_entropy_map(split.scores, split.info["thresholds"], poison, poison & bool(gt["clean_label"]), path,
                         entropy_map_title(split.info, gt), noise_mask=gt.get("cross_mask"))


class ValidationAccuracyStop:
    """The reference's early stopping (`cgd.py:411-426`) on the validation split instead of the test set.

    After each epoch: a new best accuracy is recorded; a drop of >= `tolerance` points below the best
    restores the weights of the previous epoch (a copied state_dict) and stops.

    The validation split comes from the same poisoned pool as the training set, so it holds poisons
    whose given label is the attacker's: the backdoored model "gets them right", and removing the
    backdoor would read as an accuracy drop and stop the defense it is meant to guard. Accuracy is
    therefore measured only on validation samples whose given label CLIP's zero-shot argmax agrees
    with, which drops most dirty-label poisons (CLIP sees the true class) at the cost of favouring
    easy samples.
    """

    def __init__(self, model, val_set: ImageData, val_cos: torch.Tensor, tolerance: float, context: DefenseContext,
                 precision: str):
        agree = val_cos.argmax(1) == val_set.labels
        self.images, self.labels = val_set.images[agree], val_set.labels[agree]
        self.n_val, self.n_used = len(val_set), int(agree.sum())
        self.tolerance, self.device, self.precision = tolerance, context.device, precision
        self.best = float("-inf")
        self.previous_state = _copied_state(model)  # the reference starts from the backdoored weights
        self.history: list[float] = []
        self.stopped_at: int | None = None

    def __call__(self, epoch: int, model) -> bool:
        if self.n_used == 0:
            return False
        logits = predict(model, self.images, device=self.device, precision=self.precision)
        acc = int((logits.argmax(1) == self.labels).sum()) / self.n_used  # a Python float, as the reference's
        self.history.append(round(acc, 5))
        if acc > self.best:
            self.best = acc
        elif (self.best - acc) * 100 >= self.tolerance:
            model.load_state_dict(self.previous_state)
            self.stopped_at = epoch
            return True
        self.previous_state = _copied_state(model)
        return False

    def report(self) -> dict:
        return {"metric": "accuracy on validation samples whose given label CLIP's argmax agrees with",
                "n_val": self.n_val, "n_used": self.n_used, "val_acc_per_epoch": self.history,
                "stopped_at_epoch": self.stopped_at,
                "kept_epoch": (self.stopped_at - 1) if self.stopped_at else len(self.history)}


def _copied_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- standalone split

def split_for_run(cfg) -> dict:
    """CGD's split of the training set of the harness run `cfg` (a `RunConfig`; its defense_params
    are CGD's), without retraining: what `cgd-bench cgd split` writes. Indices are positions in the
    run's training set (after the public and validation hold-outs); `dataset_indices[i]` is that
    sample's position in the dataset's training split as `load_split` returns it."""
    from ..harness.cache import Cache
    from ..harness.pipeline import defense_context, prepare_data
    from ..harness.presets import get_preset
    from ..registry import create_attack, create_defense

    preset = get_preset(cfg.preset)
    cache = Cache(cfg.cache_dir)
    data = prepare_data(cfg, preset, create_attack(cfg.attack, **cfg.attack_overrides), cache)
    defense = create_defense("cgd", preset=cfg.preset, **cfg.defense_params)
    context = defense_context(cfg, data, preset, cache, artifact_dir=None)
    split = defense.split(data.train.defender_view(), context, val_set=data.val.defender_view())
    balanced = balance_clean_indices(split.clean, data.train.labels, defense.params.balance, cfg.seed)
    return {"clean_indices": torch.nonzero(split.clean).flatten(), "clean_indices_balanced": balanced,
            "suspect_indices": torch.nonzero(split.suspect).flatten(), "rest_indices": torch.nonzero(split.rest).flatten(),
            "dataset_indices": data.train_indices, "scores": split.scores,
            "info": {**split.info, "params": defense.get_params(), "stage_times": dict(context.stage_times),
                     "run": cfg.model_dump(mode="json")}}


def write_split_file(payload: dict, path) -> Path:
    """`.json`: plain lists (for other frameworks); anything else: a torch file (`torch.load(...,
    weights_only=True)` reads it)."""
    path = Path(path)
    if path.suffix == ".json":
        plain = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in payload.items()}
        plain["scores"] = {k: v.tolist() for k, v in payload["scores"].items()}
        atomic_write_text(path, json.dumps(plain))
    else:
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())
    return path
