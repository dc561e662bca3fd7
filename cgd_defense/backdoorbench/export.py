"""Writing one of our runs (poisoned training set + backdoored model) as a BackdoorBench v2 record,
so BackdoorBench's own defenses can run on attacks declared in our YAML.

The record follows the main-branch layout (docs/reference/backdoorbench.md section 1): paths
relative to the BackdoorBench root (`./record/<name>/...`), `original_index_array` int64 and
`poison_indicator` float64 numpy arrays, `data_dict` keyed by int with `other_info` = [backdoor
label, original label], PNGs under `bd_train_dataset/<original label>/<index>.png`. bd_train is the
victim's training pool (our validation split included, the stand-in CLIP's public split left out),
indexed into the full training split. An extra `cgd_bench` key (ignored by BackdoorBench) records
our architecture, normalisation and digests of the clean data, so re-importing is exact.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..attacks.poison import PoisonedData, TriggeredTest
from ..config import validate_model
from ..data.datasets import get_dataset_info, load_split, resolve_data_root
from ..errors import CGDError
from ..harness.cache import Cache, tensor_digest
from ..harness.pipeline import RunConfig, RunData, backdoored_model, prepare_data
from ..harness.presets import get_preset
from ..harness.provenance import package_versions
from ..models import Classifier
from .formats import (ATTACK_RESULT, BB_NORMALIZATION, BD_TEST_FOLDER, BD_TRAIN_FOLDER, CGD_BENCH_KEY, INFO_FILE,
                      MODEL_FROM_BB, bb_dataset)

# our label modes in BackdoorBench's `attack_label_trans` words
_LABEL_TRANS = {"all-to-one": "all2one", "all-to-all": "all2all", "keep": "all2one"}


@dataclass
class ExportReport:
    record_dir: Path
    n_train: int
    n_modified: int
    n_triggered: int
    model_name: str
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.record_dir}: bd_train {self.n_train} images ({self.n_modified} poisoned/cross as "
                 f"PNG), bd_test {self.n_triggered} triggered images, model '{self.model_name}'"]
        return "\n".join(lines + [f"note: {w}" for w in self.warnings])


def _pool(data: RunData) -> tuple[PoisonedData, torch.Tensor]:
    """The victim's whole training pool (train + validation), ordered by position in the full split."""
    positions = torch.cat([data.train_indices, data.val_indices])
    order = torch.argsort(positions)
    t, v = data.train, data.val
    pool = PoisonedData(torch.cat([t.images, v.images])[order], torch.cat([t.labels, v.labels])[order],
                        torch.cat([t.original_labels, v.original_labels])[order],
                        torch.cat([t.poison_mask, v.poison_mask])[order],
                        torch.cat([t.cross_mask, v.cross_mask])[order],
                        t.classes, t.attack, t.target)
    return pool, positions[order]


def _save_pngs(images: torch.Tensor, paths: list[Path]) -> None:
    def save(item):
        img, path = item
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(path)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(save, zip(images, paths)))


def _bd_state(staging: Path, name: str, folder: str, images: torch.Tensor, bd_labels: torch.Tensor,
              original_labels: torch.Tensor, positions: torch.Tensor, stored: torch.Tensor, order: torch.Tensor,
              n_full: int) -> dict:
    """BackdoorBench's `prepro_cls_DatasetBD_v2.retrieve_state()` for a split whose samples at
    `positions[stored]` carry poisoned images; `order` is its `original_index_array`."""
    save_folder = f"./record/{name}/{folder}"
    data_dict, paths = {}, []
    for i in torch.nonzero(stored).flatten().tolist():
        pos, orig = int(positions[i]), int(original_labels[i])
        rel = f"{folder}/{orig}/{pos}.png"
        paths.append(staging / rel)
        data_dict[pos] = {"path": f"./record/{name}/{rel}", "other_info": [int(bd_labels[i]), orig]}
    _save_pngs(images[stored], paths)
    indicator = np.zeros(n_full, dtype=np.float64)
    indicator[positions[stored].numpy()] = 1.0
    return {
        "bd_data_container": {"save_folder_path": save_folder, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": order.numpy().astype(np.int64),
        "poison_indicator": indicator,
        "save_folder_path": save_folder,
    }


def _normalisation_note(dataset: str, model: Classifier) -> str | None:
    bb_mean, bb_std = (torch.tensor(v) for v in BB_NORMALIZATION[bb_dataset(dataset)])
    ours_mean, ours_std = model.mean.flatten().cpu(), model.std.flatten().cpu()
    # a shift of the normalised input, in units of our std, that BackdoorBench's transform introduces
    gap = float(((bb_mean - ours_mean).abs() / ours_std).max().maximum(((bb_std - ours_std) / ours_std).abs().max()))
    if gap <= 0.01:
        return None
    return (f"BackdoorBench normalises {dataset} inputs with mean {tuple(bb_mean.tolist())}, std "
            f"{tuple(bb_std.tolist())}; this model expects mean {tuple(ours_mean.tolist())}, std "
            f"{tuple(ours_std.tolist())}. cgd-bench re-imports it exactly, but BackdoorBench's own scripts will feed "
            f"it inputs shifted by up to {100 * gap:.0f}% of a standard deviation")


def write_record(out_dir: str | os.PathLike, *, data: RunData, model: Classifier, arch: str, dataset: str,
                 run_config: dict, preset: str, data_root: Path, n_full_train: int, n_full_test: int,
                 clean_digests: dict[str, str]) -> ExportReport:
    """Write `data` (the run's poisoned pool and triggered test set) and `model` as a v2 record."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CGDError(f"{out}: exists and is not an empty folder; choose a new record folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    name = out.name
    bbname = bb_dataset(dataset)
    attack = data.attack
    model_name = arch  # BackdoorBench rebuilds models by this name; ours equal its names where both have one
    warnings = []
    if arch not in MODEL_FROM_BB.values():
        warnings.append(f"BackdoorBench has no '{arch}' architecture: its own scripts cannot rebuild this model "
                        f"(the 'paper' preset trains {', '.join(sorted(MODEL_FROM_BB))}, which they can)")
    note = _normalisation_note(dataset, model)
    if note:
        warnings.append(note)

    pool, positions = _pool(data)
    # bd_test: the triggered images the run evaluated (the whole test split unless the preset caps max_test)
    triggered: TriggeredTest = data.triggered
    test_positions = data.test_indices[triggered.indices]
    size = get_dataset_info(dataset).image_size
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out.parent))
    try:
        bd_train = _bd_state(staging, name, BD_TRAIN_FOLDER, pool.images, pool.labels, pool.original_labels,
                             positions, pool.modified_mask, positions, n_full_train)
        bd_test = _bd_state(staging, name, BD_TEST_FOLDER, triggered.images, triggered.attack_labels,
                            triggered.true_labels, test_positions, torch.ones(len(test_positions), dtype=torch.bool),
                            test_positions, n_full_test)
        p = attack.poisoning
        info = {
            "attack": attack.name, "attack_target": p.target, "pratio": p.ratio,
            "attack_label_trans": _LABEL_TRANS[p.label_mode], "clean_label": p.clean_label,
            **({"cross_ratio": p.cross_ratio} if p.cross_ratio > 0 else {}),
            "dataset": bbname, "dataset_path": "./data", "model": model_name, "num_classes": len(pool.classes),
            "input_height": size, "input_width": size, "input_channel": 3, "img_size": (size, size, 3),
            "random_seed": run_config.get("seed", 0), "save_path": f"./record/{name}",
            "cgd_bench_preset": preset, "cgd_bench_attack": json.loads(json.dumps(attack.model_dump(mode="json"))),
        }
        record = {
            "model_name": model_name,
            "num_classes": len(pool.classes),
            # key order matters: BackdoorBench's loader renames keys by position
            "model": OrderedDict((k, v.detach().cpu().contiguous()) for k, v in model.net.state_dict().items()),
            "data_path": f"./data/{bbname}",
            "img_size": (size, size, 3),
            "clean_data": bbname,
            "bd_train": bd_train,
            "bd_test": bd_test,
            CGD_BENCH_KEY: {
                "arch": arch, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                "preset": preset, "data_root": str(data_root), "run_config": run_config,
                "version": package_versions()["cgd-bench"], **clean_digests,
            },
        }
        torch.save(info, staging / INFO_FILE)
        torch.save(record, staging / ATTACK_RESULT)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(out, len(pool), int(pool.modified_mask.sum()), len(test_positions), model_name, warnings)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, cache_dir: str | None = None,
               data_root: str | None = None) -> ExportReport:
    """Export the run in `run_dir` (its result.json's config) as a BackdoorBench record. The poisoned
    set and backdoored model come from the cache (recomputed, and said so, when missing)."""
    from ..registry import create_attack

    result_path = Path(run_dir) / "result.json"
    if not result_path.is_file():
        raise CGDError(f"{run_dir}: no result.json (a run folder written by `cgd-bench run --out`)")
    result = json.loads(result_path.read_text())
    if "config" not in result:
        raise CGDError(f"{result_path}: missing key 'config' (the run's configuration)")
    config = dict(result["config"])
    config.update({k: v for k, v in {"cache_dir": cache_dir, "data_root": data_root}.items() if v is not None})
    cfg = validate_model(RunConfig, config, f"{result_path} [config]")
    preset = get_preset(cfg.preset)
    attack = create_attack(cfg.attack, **cfg.attack_overrides)
    if attack.family == "no-attack":
        raise CGDError(f"{result_path}: attack '{attack.name}' poisons nothing; there is no attack record to export")
    cache = Cache(cfg.cache_dir)
    data = prepare_data(cfg, preset, attack, cache)
    model, _ = backdoored_model(cfg, preset, data, cache)
    recomputed = sorted({m.split("/")[0] for m in cache.misses if m.startswith(("poisoned", "backdoored"))})
    full_train = load_split(cfg.dataset, cfg.data_root, True, cache=cache, download=cfg.download)
    full_test = load_split(cfg.dataset, cfg.data_root, False, cache=cache, download=cfg.download)
    digests = {f"clean_{n}_digest": tensor_digest(s.images) + tensor_digest(s.labels)
               for n, s in (("train", full_train), ("test", full_test))}
    report = write_record(out_dir, data=data, model=model, arch=preset.model, dataset=cfg.dataset,
                          run_config=cfg.model_dump(mode="json"), preset=cfg.preset,
                          data_root=resolve_data_root(cfg.data_root), n_full_train=len(full_train),
                          n_full_test=len(full_test), clean_digests=digests)
    if recomputed:
        report.warnings.append(f"not in the cache, recomputed: {', '.join(recomputed)} (same seeds; bit-identical "
                               "only on the same machine and library versions)")
    return report
