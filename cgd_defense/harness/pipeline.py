"""One run: data -> poisoned set -> backdoored model -> defense -> evaluation -> result.json.

Every expensive stage is cached under a content hash of what determines it, so a grid shares one
poisoned set and one backdoored model per (dataset, attack, seed, preset) among all its defenses.
The run folder is written all at once at the end: a failed run leaves nothing half-written.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from ..attacks.poison import (FitContext, PoisonedData, TriggeredTest, fit_keys, poison_training_set,
                              selection_seed, trigger_test_set)
from ..attacks.spec import AttackSpec
from ..config import StrictModel
from ..data.datasets import ImageData, get_dataset_info, load_split
from ..data.splits import stratified_holdout
from ..defenses.base import DefenseContext, Split
from ..errors import CGDError
from ..models import Classifier, create_model
from .cache import Cache, atomic_write_text, tensor_digest
from .metrics import (attack_success_rate, clean_accuracy, defense_effectiveness_rating, robust_accuracy,
                      split_metrics)
from .presets import Preset, get_preset
from .provenance import git_commit, machine, package_versions
from .stages import RUN_LOG, StageTimer, run_log
from .trainer import predict, train

log = logging.getLogger(__name__)

PUBLIC_SPLIT_SEED = 0  # fixed, so one stand-in CLIP serves every run seed


class RunConfig(StrictModel):
    dataset: str = "cifar10"
    data_root: str | None = None
    download: bool = False
    attack: str = "badnets"
    attack_overrides: dict[str, Any] = Field(default_factory=dict)
    defense: str = "none"
    defense_params: dict[str, Any] = Field(default_factory=dict)
    preset: str = "smoke"
    seed: int = 0
    clip: str | None = Field(None, description="CLIP for CLIP-guided defenses; default: the dataset's stand-in")
    public_holdout: bool | None = Field(None, description="hold out the public split; default: when the CLIP is a stand-in")
    device: str | None = None
    cache_dir: str | None = None

    def resolved_clip(self) -> str:
        return self.clip or f"standin:{self.dataset}"

    def clip_key(self, defense) -> dict:
        """What of the CLIP enters the keys of a result of `defense` (a `Defense`): its name, and when
        the defense loads a stand-in, what of the stand-in's recipe identifies it (`recipe_key`)."""
        from ..clip.standin import recipe_key  # deferred: the CLIP layer imports open_clip

        return {"clip": self.resolved_clip(), **(recipe_key(self.resolved_clip()) if defense.uses_clip() else {})}

    def holds_out_public(self) -> bool:
        if self.public_holdout is not None:
            return self.public_holdout
        return self.resolved_clip().startswith("standin:")


@dataclass
class RunData:
    """The data of one run. `train` is what the victim trained on; `val` is held out of the same
    poisoned pool for model selection; `test` is only ever used by the evaluator."""

    train: PoisonedData
    val: PoisonedData
    test: ImageData
    triggered: TriggeredTest
    public_indices: torch.Tensor  # indices into the full training set, for the stand-in CLIP
    attack: AttackSpec
    info: dict
    # positions of `train`, `val` and `test` in the dataset's splits as `load_split` returns them
    # (what the BackdoorBench export writes as `original_index_array`)
    train_indices: torch.Tensor | None = None
    val_indices: torch.Tensor | None = None
    test_indices: torch.Tensor | None = None


def _limit(data: ImageData, n: int | None, seed: int) -> tuple[ImageData, torch.Tensor]:
    """At most `n` samples, stratified; also returns the kept positions."""
    if n is None or n >= len(data):
        return data, torch.arange(len(data))
    keep, _ = stratified_holdout(data.labels, 1 - n / len(data), seed)
    return data.subset(keep), keep


def prepare_data(cfg: RunConfig, preset: Preset, attack: AttackSpec, cache: Cache) -> RunData:
    info = get_dataset_info(cfg.dataset)
    full_train = load_split(cfg.dataset, cfg.data_root, True, cache=cache, download=cfg.download)
    test = load_split(cfg.dataset, cfg.data_root, False, cache=cache, download=cfg.download)
    if attack.poisoning.target >= full_train.num_classes:
        raise CGDError(f"attack '{attack.name}': target {attack.poisoning.target} is not a class of "
                       f"{info.title} ({full_train.num_classes} classes)")
    full_train, train_kept = _limit(full_train, preset.max_train, 0)
    test, test_kept = _limit(test, preset.max_test, 0)
    if cfg.holds_out_public() and preset.public_fraction > 0:
        victim_idx, public_idx = stratified_holdout(full_train.labels, preset.public_fraction, PUBLIC_SPLIT_SEED)
    else:
        victim_idx, public_idx = torch.arange(len(full_train)), torch.empty(0, dtype=torch.long)
    pool = full_train.subset(victim_idx)
    # learned triggers fit on the attacker's pool; the public split is data the victim never sees
    fit = FitContext(pool, cache, preset, public=full_train.subset(public_idx) if len(public_idx) else None,
                     device=cfg.device)
    poison_spec = {"images": tensor_digest(pool.images), "labels": tensor_digest(pool.labels),
                   "attack": attack.model_dump(mode="json"), "classes": pool.classes}
    if fitted := fit_keys(attack, pool.images.shape[-1], fit):
        poison_spec["fitted"] = fitted
    if (seed := selection_seed(attack.poisoning)) != attack.poisoning.seed:
        poison_spec["selection_seed"] = seed  # only where the draw changed, so other cached sets stay valid
    poisoned = PoisonedData.from_payload(cache.get_or_compute(
        "poisoned", poison_spec, lambda: poison_training_set(attack, pool, fit).to_payload()))
    train_idx, val_idx = stratified_holdout(poisoned.labels, preset.val_fraction, cfg.seed)
    triggered = trigger_test_set(attack, test, fit)
    data_info = {
        "dataset": cfg.dataset, "n_full_train": len(full_train), "n_public_holdout": len(public_idx),
        "public_holdout": "stratified hold-out of the training set for the stand-in CLIP; the victim never sees it"
        if len(public_idx) else "none",
        "n_victim_pool": len(pool), "n_train": len(train_idx), "n_val": len(val_idx), "n_test": len(test),
        "n_triggered_test": len(triggered.true_labels),
        "n_poisoned_train": int(poisoned.poison_mask[train_idx].sum()),
        "n_cross_train": int(poisoned.cross_mask[train_idx].sum()),
    }
    pool_positions = train_kept[victim_idx]
    return RunData(poisoned.subset(train_idx), poisoned.subset(val_idx), test, triggered, public_idx, attack,
                   data_info, train_indices=pool_positions[train_idx], val_indices=pool_positions[val_idx],
                   test_indices=test_kept)


def build_model(preset: Preset, dataset: str, num_classes: int) -> Classifier:
    info = get_dataset_info(dataset)
    return Classifier(create_model(preset.model, num_classes), info.mean, info.std, arch=preset.model)


def backdoored_model(cfg: RunConfig, preset: Preset, data: RunData, cache: Cache) -> tuple[Classifier, str]:
    spec = {"images": tensor_digest(data.train.images), "labels": tensor_digest(data.train.labels),
            "model": preset.model, "train": preset.train.model_dump(mode="json"), "seed": cfg.seed,
            "num_classes": len(data.train.classes)}

    def compute():
        torch.manual_seed(cfg.seed)
        model = build_model(preset, cfg.dataset, len(data.train.classes))
        train(model, data.train.images, data.train.labels, preset.train, seed=cfg.seed, device=cfg.device,
              desc=f"train victim ({data.attack.name})")
        return {"state_dict": {k: v.cpu() for k, v in model.net.state_dict().items()}}

    payload = cache.get_or_compute("backdoored", spec, compute)
    model = build_model(preset, cfg.dataset, len(data.train.classes))
    model.net.load_state_dict(payload["state_dict"])
    return model.eval(), cache.key("backdoored", spec)


def evaluate(model: Classifier, data: RunData, preset: Preset, device=None) -> dict:
    clean_logits = predict(model, data.test.images, batch_size=preset.eval_batch_size, device=device,
                           precision=preset.train.precision)
    out = {"clean_acc": clean_accuracy(clean_logits, data.test.labels)}
    if data.attack.family == "no-attack":
        out.update({"asr": None, "ra": None})
    else:
        trig_logits = predict(model, data.triggered.images, batch_size=preset.eval_batch_size, device=device,
                              precision=preset.train.precision)
        out["asr"] = attack_success_rate(trig_logits, data.triggered.attack_labels)
        out["ra"] = robust_accuracy(trig_logits, data.triggered.true_labels)
    return out


def _oracle_clean_subset(train: PoisonedData, fraction: float, seed: int) -> tuple[torch.Tensor, ImageData]:
    """`fraction` of the training set, drawn (seeded) from samples the attack did not touch: the
    trusted clean set that clean-data defenses assume (BackdoorBench: 5%)."""
    clean_idx = torch.nonzero(~train.modified_mask).flatten()
    n = min(len(clean_idx), int(round(fraction * len(train))))
    g = torch.Generator().manual_seed(seed + 7919)
    chosen = torch.sort(clean_idx[torch.randperm(len(clean_idx), generator=g)[:n]]).values
    return chosen, ImageData(train.images[chosen], train.labels[chosen], train.classes)


def _split_report(split: Split, gt: PoisonedData) -> dict:
    report = split_metrics(split.suspect, split.clean, gt.poison_mask, split.scores)
    report["suspect_tpr_cross"] = (float((split.suspect & gt.cross_mask).sum()) / int(gt.cross_mask.sum())
                                   if gt.cross_mask.any() else None)
    return report


def _json_safe(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def save_split_artifacts(defense, split: Split, data: RunData, folder: Path) -> None:
    """`split.pt`: the defense's split beside the ground truth it never saw (for analysis only), and
    the defense's own figure of it when it draws one (`draw_split_figure(split, gt, path)`)."""
    gt = {"poison_mask": data.train.poison_mask, "cross_mask": data.train.cross_mask,
          "clean_label": data.attack.poisoning.clean_label, "attack": data.attack.name}
    torch.save({"defense": defense.name, "split": split.to_payload(), "ground_truth": gt}, Path(folder) / "split.pt")
    draw = getattr(defense, "draw_split_figure", None)
    if draw is not None:
        draw(split, gt, Path(folder) / "entropy_map.png")


def defense_context(cfg: RunConfig, data: RunData, preset: Preset, cache: Cache,
                    artifact_dir: Path | None) -> DefenseContext:
    """What the harness lends a defense for the run `cfg` on `data` (see `DefenseContext`)."""
    context = DefenseContext(dataset=cfg.dataset, classes=data.train.classes, preset=preset, cache=cache,
                             seed=cfg.seed, device=cfg.device, clip=cfg.resolved_clip(), artifact_dir=artifact_dir)
    context.extra["public_indices"] = data.public_indices
    context.extra["data_root"] = cfg.data_root
    context.oracle_clean_subset = lambda fraction: _oracle_clean_subset(data.train, fraction, cfg.seed)
    context.report_poison_rate = lambda idx: float(data.train.poison_mask[torch.as_tensor(idx)].float().mean()) \
        if len(idx) else float("nan")
    return context


def defend_and_evaluate(cfg: RunConfig, data: RunData, model: Classifier, model_key: str, cache: Cache,
                        artifact_dir: Path, timer: StageTimer) -> tuple[dict, Classifier]:
    """Evaluate `model` (the backdoored model, identified by `model_key` in cache specs), apply the
    defense `cfg.defense` to it with `data`, evaluate the defended model. Returns the result fields
    (metrics before and after, DER, the defense's parameters, info and split report) and the
    defended model. `run` and the BackdoorBench plugin both go through here."""
    from ..registry import create_defense, defense_entry  # deferred: imports defenses

    preset = get_preset(cfg.preset)
    defense = create_defense(cfg.defense, preset=cfg.preset, **cfg.defense_params)
    entry = defense_entry(cfg.defense)
    with timer("evaluate_backdoored"):
        before = evaluate(model, data, preset, cfg.device)
    context = defense_context(cfg, data, preset, cache, artifact_dir)
    defense_spec = {"backdoored": model_key, "defense": cfg.defense, "params": defense.get_params(),
                    "preset": cfg.preset, "seed": cfg.seed, **cfg.clip_key(defense),
                    "val": tensor_digest(data.val.images), **defense.code_revision()}
    with timer("defense"):
        if cfg.defense == "none":
            defended, split, defense_info = model, None, {}
        else:
            defended = copy.deepcopy(model)  # the architecture to load the defended weights into

            def compute():
                defense.fit(model, data.train.defender_view(), val_set=data.val.defender_view(), context=context)
                split_ = getattr(defense, "split_", None)
                return {"state_dict": {k: v.cpu() for k, v in defense.model_.net.state_dict().items()},
                        "split": split_.to_payload() if split_ is not None else None,
                        "info": json.loads(json.dumps(getattr(defense, "info_", {}), default=str)),
                        "stage_times": dict(context.stage_times)}
            payload = cache.get_or_compute("defended", defense_spec, compute)
            defended.net.load_state_dict(payload["state_dict"])
            defended.eval()
            split = Split.from_payload(payload["split"]) if payload["split"] else None
            defense_info = payload["info"]
            timer.times.update({f"defense.{k}": v for k, v in payload["stage_times"].items()})
    if split is not None and artifact_dir is not None:
        save_split_artifacts(defense, split, data, artifact_dir)
    with timer("evaluate"):
        after = evaluate(defended, data, preset, cfg.device)
    fields = {
        **after,
        "der": None if after["asr"] is None else defense_effectiveness_rating(
            before["clean_acc"], before["asr"], after["clean_acc"], after["asr"]),
        "no_defense": before,
        "defense": cfg.defense, "threat_model": entry.threat_model,
        "clip": cfg.resolved_clip() if entry.threat_model != "model-only" else None,
        "defense_params": defense.get_params(), "defense_info": defense_info,
        "split": _split_report(split, data.train) if split is not None else None,
        "clip_info": _clip_info(split, defense_info),
    }
    return fields, defended


def _clip_info(split: Split | None, defense_info: dict) -> dict | None:
    """The CLIP provenance a CLIP-guided defense recorded: in its own split (CGD) or in the CGD split
    it drew its clean data from (clean-data defenses with clean_source=cgd); None if no CLIP was used."""
    if split is not None and isinstance(split.info.get("clip_info"), dict):
        return split.info["clip_info"]
    nested = (defense_info or {}).get("cgd_split_info") or {}
    return nested.get("clip_info") if isinstance(nested.get("clip_info"), dict) else None


def run(cfg: RunConfig, out_dir: str | os.PathLike | None = None) -> dict:
    """Run one (dataset, attack, defense, preset, seed) job; return the result and, if `out_dir` is
    given, write `out_dir/result.json` (and any defense figures) atomically at the end."""
    from ..registry import create_attack, create_defense  # deferred: imports defenses

    timer = StageTimer()
    preset = get_preset(cfg.preset)
    attack = create_attack(cfg.attack, **cfg.attack_overrides)
    create_defense(cfg.defense, preset=cfg.preset, **cfg.defense_params)  # fail on bad parameters before any work
    cache = Cache(cfg.cache_dir)
    commit = git_commit()  # the code this run loaded: the checkout may move on while a long run goes
    staging = Path(tempfile.mkdtemp(prefix="cgd-run-"))  # moved into out_dir only when the run succeeded
    try:
        t_total = time.perf_counter()
        with run_log(staging / RUN_LOG):
            log.info("run: %s/%s/%s, preset %s, seed %d", cfg.dataset, cfg.attack, cfg.defense, cfg.preset, cfg.seed)
            with timer("data"):
                data = prepare_data(cfg, preset, attack, cache)
            with timer("backdoor_training"):
                model, backdoor_key = backdoored_model(cfg, preset, data, cache)
            fields, _ = defend_and_evaluate(cfg, data, model, backdoor_key, cache, staging, timer)
        result: dict[str, Any] = {
            **fields,
            "attack": attack.name, "attack_family": attack.family, "dataset": cfg.dataset, "preset": cfg.preset,
            "seed": cfg.seed, "model": preset.model,
            "data": data.info,
            "stage_times": timer.times,
            "cache": {"hits": cache.hits, "misses": cache.misses},
            "config": cfg.model_dump(mode="json"),
            "resolved": {"preset": preset.model_dump(mode="json"), "attack": attack.model_dump(mode="json")},
            "versions": package_versions(), "git_commit": commit, "machine": machine(),
        }
        result["stage_times"]["total"] = round(time.perf_counter() - t_total, 3)
        result = _json_safe(result)
        if out_dir:
            write_run_folder(result, staging, out_dir)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_run_folder(result: dict, staging: Path, out_dir: str | os.PathLike) -> None:
    """Write `result.json` into `staging`, then move everything staged into `out_dir`."""
    atomic_write_text(staging / "result.json", json.dumps(result, indent=2))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in staging.iterdir():
        shutil.move(str(f), str(out / f.name))
