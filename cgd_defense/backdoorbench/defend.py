"""Defending an imported BackdoorBench record with any registered defense, through the same harness
as `cgd-bench run` (`harness.pipeline.defend_and_evaluate`), and writing what BackdoorBench reads.

Output, under `RECORD_DIR/defense/<defense>/` (BackdoorBench's layout, section 4 of the notes):
- `defense_result.pt`: `{'model_name', 'num_classes', 'model'}`, the state dict of the bare network
  in the record's key order (BackdoorBench's loader renames keys by position), loadable with plain
  `torch.load(weights_only=True)`; inputs normalised as the record's model expects them.
- `<defense>_df.csv`, `<defense>_df_summary.csv`: `test_acc, test_asr, test_ra` as fractions, in the
  shape of BackdoorBench's `Metric_Aggregator` dumps (summary rows `last, valid_max, exist_nan_value`).
- `result.json`: our full result (metrics before/after, DER, split quality, provenance).

`split` writes CGD's clean part as an index file in `np.savetxt(fmt='%d')` form: 0-based positions
in the clean training set, what BackdoorBench's fp/nad/anp/i-bau read through `--index`.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..attacks.spec import AttackSpec, TriggerComponent
from ..data.splits import stratified_holdout
from ..defenses.base import Split
from ..errors import CGDError
from ..harness.cache import Cache, atomic_write_text, tensor_digest
from ..harness.pipeline import (RunConfig, RunData, _json_safe, defend_and_evaluate, defense_context,
                                write_run_folder)
from ..harness.presets import get_preset
from ..harness.provenance import git_commit, machine, package_versions
from ..harness.stages import RUN_LOG, StageTimer, run_log
from ..models import Classifier
from .formats import CROSS_SAMPLE_ATTACKS
from .record import BackdoorBenchRecord, read_record

log = logging.getLogger(__name__)

DEFAULT_PRESET = "paper"  # BackdoorBench's own recipe (PreActResNet-18, 100 epochs)
_CLEAN_LABEL_ATTACKS = ("sig", "label_consistent", "lc")


def record_attack_spec(record: BackdoorBenchRecord) -> AttackSpec:
    """A descriptive AttackSpec for the record's attack: its name, family, target and ratio. The
    poisoned images are the record's; this spec never re-poisons anything (trigger `none`)."""
    name = record.attack.lower()
    family = ("clean-label" if name in _CLEAN_LABEL_ATTACKS or record.info.get("clean_label")
              else "sample-specific" if name in CROSS_SAMPLE_ATTACKS else "dirty-label")
    label_mode = "all-to-all" if record.label_mode == "all2all" else "all-to-one"
    ratio = record.ratio if record.ratio is not None and 0 <= record.ratio < 1 else 0.0  # 0: not recorded
    return AttackSpec(name=record.attack, citation=f"BackdoorBench record {record.path}", family=family,
                      source=str(record.path), trigger=[TriggerComponent(kind="none")],
                      poisoning={"ratio": ratio, "target": max(record.target or 0, 0), "label_mode": label_mode})


def record_run_data(record: BackdoorBenchRecord, val_fraction: float, seed: int) -> RunData:
    """The record as the harness's RunData: bd_train split into train / validation (stratified,
    seeded, for the defense's model selection), the clean test split and bd_test. The public split
    is what bd_train leaves out of the training set (nothing, for BackdoorBench's own records)."""
    train_idx, val_idx = stratified_holdout(record.train.labels, val_fraction, seed)
    in_record = torch.zeros(record.n_full_train, dtype=torch.bool)
    in_record[record.train_indices] = True
    public = torch.nonzero(~in_record).flatten()
    train = record.train.subset(train_idx)
    info = {
        "dataset": record.dataset, "source": f"BackdoorBench record {record.path} ({record.format})",
        "n_full_train": record.n_full_train, "n_public_holdout": len(public), "n_victim_pool": len(record.train),
        "n_train": len(train_idx), "n_val": len(val_idx), "n_test": len(record.test),
        "n_triggered_test": len(record.triggered.true_labels),
        "n_poisoned_train": int(train.poison_mask.sum()), "n_cross_train": int(train.cross_mask.sum()),
    }
    return RunData(train, record.train.subset(val_idx), record.test, record.triggered, public,
                   record_attack_spec(record), info, train_indices=record.train_indices[train_idx],
                   val_indices=record.train_indices[val_idx], test_indices=torch.arange(len(record.test)))


def _record_model_key(record: BackdoorBenchRecord, cache: Cache) -> str:
    """Identifies the record's model and training data in the cache specs of defense outputs."""
    return cache.key("backdoorbench-record", {
        "model": record.state_dict_digest, "arch": record.arch, "mean": record.model.mean.flatten().tolist(),
        "std": record.model.std.flatten().tolist(), "images": tensor_digest(record.train.images),
        "labels": tensor_digest(record.train.labels)})


def _run_config(record: BackdoorBenchRecord, defense: str, params: dict | None, preset: str | None, seed: int,
                clip: str | None, device: str | None, cache_dir: str | None) -> RunConfig:
    preset = preset or (record.exported_by or {}).get("preset") or DEFAULT_PRESET
    cfg = RunConfig(dataset=record.dataset, data_root=str(record.data_root), attack=record.attack,
                    defense=defense, defense_params=dict(params or {}), preset=preset, seed=seed, clip=clip,
                    device=device, cache_dir=cache_dir)
    if defense == "cgd" or cfg.defense_params.get("clean_source") == "cgd":  # the CLIP-guided paths
        _warn_if_standin_sees_training_data(record, cfg)
    return cfg


def defense_result_payload(model: Classifier, model_name: str, num_classes: int) -> dict:
    """BackdoorBench's `save_defense_result` dict: the bare network's state dict, key order kept."""
    state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in model.net.state_dict().items())
    return {"model_name": model_name, "num_classes": int(num_classes), "model": state}


def write_metric_csvs(folder: Path, prefix: str, metrics: dict[str, float | None]) -> list[Path]:
    """`<prefix>_df.csv` (one row) and `<prefix>_df_summary.csv` (rows last / valid_max /
    exist_nan_value), with NaN written as 'nan_value' as BackdoorBench's Metric_Aggregator does."""
    row = {k: ("nan_value" if v is None or v != v else float(v)) for k, v in metrics.items()}
    df = pd.DataFrame([row], dtype=object)
    numeric = {k: v for k, v in row.items() if v != "nan_value"}
    summary = pd.DataFrame(
        [{k: numeric.get(k, "nan_value") for k in row}, {k: numeric.get(k, "nan_value") for k in row},
         {k: row[k] == "nan_value" for k in row}], index=["last", "valid_max", "exist_nan_value"], dtype=object)
    paths = [folder / f"{prefix}_df.csv", folder / f"{prefix}_df_summary.csv"]
    df.to_csv(paths[0])
    summary.to_csv(paths[1])
    return paths


def defend_record(record_dir: str | os.PathLike, defense: str = "cgd", params: dict | None = None, *,
                  preset: str | None = None, seed: int = 0, data_root: str | None = None, clip: str | None = None,
                  device: str | None = None, cache_dir: str | None = None, trust: bool = False) -> dict:
    """Run `defense` on a BackdoorBench record and write RECORD_DIR/defense/<defense>/; returns
    our result dict (also written there as result.json)."""
    timer = StageTimer()
    t_total = time.perf_counter()
    commit = git_commit()  # the code this run loaded: the checkout may move on while it runs
    cache = Cache(cache_dir)
    with timer("data"):
        record = read_record(record_dir, data_root=data_root, trust=trust, cache=cache)
    cfg = _run_config(record, defense, params, preset, seed, clip, device, cache_dir)
    preset_obj = get_preset(cfg.preset)
    data = record_run_data(record, preset_obj.val_fraction, seed)
    staging = Path(tempfile.mkdtemp(prefix="cgd-bb-defend-"))
    try:
        with run_log(staging / RUN_LOG):
            fields, defended = defend_and_evaluate(cfg, data, record.model, _record_model_key(record, cache), cache,
                                                   staging, timer)
        result: dict[str, Any] = {
            **fields,
            "attack": record.attack, "attack_family": data.attack.family, "dataset": record.dataset,
            "preset": cfg.preset, "seed": seed, "model": record.arch,
            "record": {"path": str(record.path), "format": record.format, "model_name": record.model_name,
                       "target": record.target, "ratio": record.ratio, "label_mode": record.label_mode,
                       "info": _json_safe(_plain(record.info))},
            "data": data.info,
            "stage_times": timer.times,
            "cache": {"hits": cache.hits, "misses": cache.misses},
            "config": cfg.model_dump(mode="json"),
            "resolved": {"preset": preset_obj.model_dump(mode="json")},
            "versions": package_versions(), "git_commit": commit, "machine": machine(),
        }
        result["stage_times"]["total"] = round(time.perf_counter() - t_total, 3)
        result = _json_safe(result)
        torch.save(defense_result_payload(defended, record.model_name, record.num_classes),
                   staging / "defense_result.pt")
        write_metric_csvs(staging, defense, {"test_acc": result["clean_acc"], "test_asr": result["asr"],
                                             "test_ra": result["ra"]})
        write_run_folder(result, staging, record.path / "defense" / defense)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _plain(value: Any) -> Any:
    """info.pickle values as JSON-able Python (numpy scalars and arrays become numbers and lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------------------------------ split


@dataclass
class IndexFileReport:
    path: Path
    n_indices: int
    n_train: int
    n_modified_included: int  # ground truth: record samples with a poisoned image among them

    def summary(self) -> str:
        return (f"wrote {self.path}: {self.n_indices} clean indices ({100 * self.n_indices / self.n_train:.1f}% of "
                f"bd_train); ground truth: {self.n_modified_included} of them are poisoned/cross samples in the "
                f"record\nuse: python defense/fp.py --result_file <record name> --index {self.path} "
                f"(also nad, anp, i-bau)")


def clean_indices(split: Split, train_indices: torch.Tensor) -> torch.Tensor:
    """The split's clean part as sorted positions in the clean training set."""
    if len(split.clean) != len(train_indices):
        raise ValueError(f"split covers {len(split.clean)} samples, the record's bd_train {len(train_indices)}")
    return torch.sort(train_indices[split.clean.bool()]).values


def write_index_file(indices: torch.Tensor, path: str | os.PathLike) -> Path:
    """One 0-based index per line (`np.savetxt(fmt='%d')`), what BackdoorBench's `choose_index` loads."""
    if len(indices) < 2:
        # np.loadtxt reads a one-line file as a 0-d array, which BackdoorBench cannot subset with
        raise CGDError(f"the clean split has {len(indices)} sample(s); BackdoorBench needs an index file of at least 2")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(f"{int(i)}\n" for i in indices.tolist()))
    return path


def split_record(record_dir: str | os.PathLike, out_file: str | os.PathLike, params: dict | None = None, *,
                 preset: str | None = None, seed: int = 0, data_root: str | None = None, clip: str | None = None,
                 device: str | None = None, cache_dir: str | None = None, trust: bool = False) -> IndexFileReport:
    """Run CGD's data separation on the record's bd_train (less the validation part) and write its
    clean part as an index file for BackdoorBench's clean-data defenses (the paper's "adapted" setting)."""
    from ..registry import create_defense  # deferred: imports defenses

    cache = Cache(cache_dir)
    record = read_record(record_dir, data_root=data_root, trust=trust, cache=cache)
    cfg = _run_config(record, "cgd", params, preset, seed, clip, device, cache_dir)
    defense = create_defense("cgd", preset=cfg.preset, **cfg.defense_params)
    preset_obj = get_preset(cfg.preset)
    # as in `defend`: the validation part (for CLIP calibration) is held out, so never in the index file
    data = record_run_data(record, preset_obj.val_fraction, seed)
    context = defense_context(cfg, data, preset_obj, cache, artifact_dir=None)
    split = defense.split(data.train.defender_view(), context, val_set=data.val.defender_view())
    indices = clean_indices(split, data.train_indices)
    path = write_index_file(indices, out_file)
    chosen = split.clean.bool()
    return IndexFileReport(path, len(indices), len(record.train), int(data.train.modified_mask[chosen].sum()))


def _warn_if_standin_sees_training_data(record: BackdoorBenchRecord, cfg: RunConfig) -> None:
    """A stand-in CLIP trains on the dataset's public split, which only our own exports hold out of
    bd_train; on BackdoorBench's records (bd_train = the whole training set) it overlaps bd_train."""
    if cfg.resolved_clip().startswith("standin:") and len(record.train) == record.n_full_train:
        log.warning("%s: bd_train is the whole training set, so the stand-in CLIP '%s' is trained on part of it "
                    "(clean originals); pass a real CLIP (--clip ARCH:WEIGHTS) for a faithful CLIP-guided defense",
                    record.path, cfg.resolved_clip())
