"""Reading a BackdoorBench attack record into cgd-bench's data and model types.

A record folder (`record/<name>/` in a BackdoorBench checkout, or anywhere after copying) holds
`attack_result.pt` and `info.pickle`; main-branch (v2.x) records keep the poisoned images as PNG
files under `bd_train_dataset/` and `bd_test_dataset/`, v1 records inline. Only poisoned samples are
stored: the clean images come from our dataset registry, at the positions the record names
(`original_index_array`), so the clean data must be in the order BackdoorBench indexed (torchvision's
for CIFAR). Every poisoned sample's recorded original label is checked against that data, which
catches a wrong `--data-root` or ordering before anything is trained.

Paths inside a record are relative to the BackdoorBench root (main) or absolute on the machine that
wrote it (v2 branch); both are rebuilt from the record folder itself.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..attacks.poison import PoisonedData, TriggeredTest
from ..data.datasets import ImageData, load_split, resolve_data_root
from ..errors import CGDError
from ..harness.cache import Cache, tensor_digest
from ..models import Classifier, create_model, is_model, list_models
from .formats import (ATTACK_RESULT, BB_ARCHITECTURES, BB_NORMALIZATION, BD_STATE_KEYS, BD_TEST_FOLDER,
                      BD_TRAIN_FOLDER, CGD_BENCH_KEY, CROSS_SAMPLE_ATTACKS, INFO_FILE, MODEL_FROM_BB, RECORD_KEYS,
                      our_dataset)
from .safe_load import load_pickled

log = logging.getLogger(__name__)


@dataclass
class BackdoorBenchRecord:
    """An imported record. `train` is BackdoorBench's bd_train in its `original_index_array` order
    (poison_mask: carries the backdoor; cross_mask: trigger noise kept at its label); `test` the
    clean test split; `triggered` its bd_test."""

    path: Path
    format: str                  # "v2" (main branch, PNG files) or "v1" (inline images)
    attack: str
    target: int | None
    ratio: float | None
    label_mode: str
    dataset: str                 # our registry name
    model_name: str              # as the record names it
    arch: str                    # our registry name
    num_classes: int
    train: PoisonedData
    train_indices: torch.Tensor  # positions of `train` in the clean training split
    n_full_train: int
    test: ImageData
    triggered: TriggeredTest
    model: Classifier
    state_dict_digest: str
    data_root: Path
    info: dict = field(default_factory=dict)  # info.pickle: the attack's arguments
    exported_by: dict | None = None           # the cgd_bench key of records we wrote

    @property
    def modified_mask(self) -> torch.Tensor:
        """BackdoorBench's poison_indicator over `train`: every sample it stored a poisoned image for."""
        return self.train.modified_mask

    def summary(self) -> str:
        t = self.train
        ratio = "?" if self.ratio is None else f"{self.ratio:g}"
        lines = [
            f"record     {self.path} ({self.format})",
            f"attack     {self.attack}  target {self.target}  ratio {ratio}  labels {self.label_mode}",
            f"dataset    {self.dataset} from {self.data_root}: bd_train {len(t)} of {self.n_full_train} training "
            f"images, {int(t.poison_mask.sum())} poisoned, {int(t.cross_mask.sum())} cross (kept label)",
            f"test       {len(self.test)} clean, {len(self.triggered.true_labels)} triggered (bd_test)",
            f"model      {self.model_name} -> cgd-bench '{self.arch}', {self.num_classes} classes, "
            f"{sum(p.numel() for p in self.model.parameters()):,} parameters",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ helpers


def _require(mapping: Any, keys: tuple[str, ...], where: str, source: str) -> None:
    if not isinstance(mapping, dict):
        raise CGDError(f"{source}: '{where}' should be a dict, got {type(mapping).__name__}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        prefix = f"{where}." if where else ""
        raise CGDError(f"{source}: missing key(s) {', '.join(prefix + k for k in missing)}")


def _path_parts(path: str) -> list[str]:
    return [p for p in re.split(r"[\\/]+", path) if p not in ("", ".")]


def _rebuilt_data_root(record_dir: Path, data_path: str) -> Path | None:
    """BackdoorBench's own rule: the checkout root is what precedes `record/`, the dataset folder is
    `data_path` from its `data` component on (`./data/cifar10`, `/other/machine/data/cifar10`)."""
    parts = _path_parts(str(data_path))
    if "data" not in parts or record_dir.parent.name != "record":
        return None
    return record_dir.parent.parent.joinpath(*parts[parts.index("data"):])


def _choose_data_root(record_dir: Path, raw: dict, data_root: str | os.PathLike | None) -> Path:
    if data_root is not None:
        return resolve_data_root(data_root)
    rebuilt = _rebuilt_data_root(record_dir, raw["data_path"])
    if rebuilt is not None and rebuilt.is_dir():
        return rebuilt.resolve()
    hint = (raw.get(CGD_BENCH_KEY) or {}).get("data_root")
    if hint and Path(hint).is_dir():
        return Path(hint)
    return resolve_data_root(None)


def _to_chw_uint8(img: Any, where: str) -> torch.Tensor:
    if isinstance(img, Image.Image):
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)
    t = torch.as_tensor(np.asarray(img))
    if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] != 3:
        raise CGDError(f"{where}: expected an RGB image, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        t = t * 255 if float(t.max()) <= 1.0 else t
        t = t.round().clamp(0, 255)
    return t.to(torch.uint8).contiguous()


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def _read_pngs(paths: list[Path]) -> list[torch.Tensor]:
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(_read_png, paths))


def _check_image_size(images: list[torch.Tensor], positions: list[int], clean: ImageData, where: str) -> None:
    expected = tuple(clean.images.shape[1:])
    for img, pos in zip(images, positions):
        if tuple(img.shape) != expected:
            raise CGDError(f"{where}: the poisoned image of index {pos} is {tuple(img.shape)} (C, H, W) but the "
                           f"clean images are {expected}")


def _check_original_labels(positions: list[int], original: list[int], clean: ImageData, where: str,
                           data_root: Path) -> None:
    """The record's original labels must be the clean data's labels at the same positions."""
    pos = torch.as_tensor(positions, dtype=torch.long)
    rec = torch.as_tensor(original, dtype=torch.long)
    bad = torch.nonzero(clean.labels[pos] != rec).flatten()
    if len(bad):
        i = int(bad[0])
        raise CGDError(
            f"{where}: {len(bad)} of {len(pos)} poisoned samples have an original label that differs from the "
            f"clean data under {data_root} at the same index (first: index {int(pos[i])}, record says "
            f"{int(rec[i])}, data says {int(clean.labels[pos[i]])}): the clean data is not the set, or not in the "
            f"order, the record indexes (BackdoorBench indexes torchvision's order, e.g. cifar-10-batches-py); "
            f"pass --data-root pointing at that copy")


@dataclass
class _Poisoned:
    """Poisoned samples of one split, by position in the clean split."""

    positions: list[int]
    images: list[torch.Tensor]
    bd_labels: list[int]
    original_labels: list[int]


def _index_array(value: Any, where: str, source: str) -> np.ndarray:
    try:
        arr = np.asarray(value).astype(np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise CGDError(f"{source}: '{where}' is not an array of integers") from None
    return arr


# ------------------------------------------------------------------------------------------ v2


def _png_path(record_dir: Path, folder: str, recorded: Any, original_label: int, index: int) -> Path:
    """Where a recorded PNG lies now: its path from the bd folder on, inside this record folder."""
    parts = _path_parts(str(recorded)) if isinstance(recorded, str) else []
    if folder in parts:
        tail = parts[len(parts) - 1 - parts[::-1].index(folder) + 1:]
        return record_dir.joinpath(folder, *tail)
    return record_dir / folder / str(original_label) / f"{index}.png"


def _read_v2_split(state: Any, where: str, default_folder: str, clean: ImageData, record_dir: Path,
                   source: str) -> tuple[np.ndarray, _Poisoned]:
    _require(state, BD_STATE_KEYS, where, source)
    container = state["bd_data_container"]
    _require(container, ("data_dict",), f"{where}.bd_data_container", source)
    data_dict = {int(k): v for k, v in container["data_dict"].items()}
    order = _index_array(state["original_index_array"], f"{where}.original_index_array", source)
    indicator = np.asarray(state["poison_indicator"]).reshape(-1)
    if len(indicator) != len(clean):
        raise CGDError(f"{source}: {where}.poison_indicator has {len(indicator)} entries but the clean split has "
                       f"{len(clean)} images: the data root does not hold the dataset the record was made from")
    if len(order) and (order.min() < 0 or order.max() >= len(clean)):
        raise CGDError(f"{source}: {where}.original_index_array holds indices outside 0..{len(clean) - 1}")
    save_folder = container.get("save_folder_path") or state.get("save_folder_path")
    folder = _path_parts(str(save_folder))[-1] if isinstance(save_folder, str) and save_folder else default_folder

    poisoned = _Poisoned([], [], [], [])
    png_paths: list[Path] = []
    for pos in sorted(set(int(i) for i in np.nonzero(indicator == 1)[0])):
        if pos not in data_dict:
            raise CGDError(f"{source}: {where}.poison_indicator marks index {pos} as poisoned but "
                           f"{where}.bd_data_container.data_dict has no entry for it")
        entry = data_dict[pos]
        if isinstance(entry, dict):
            _require(entry, ("other_info",), f"{where}.bd_data_container.data_dict[{pos}]", source)
            bd_label, original = (int(v) for v in list(entry["other_info"])[:2])
            png = _png_path(record_dir, folder, entry.get("path"), original, pos)
            if not png.is_file():
                raise CGDError(f"{source}: missing PNG for {where} index {pos}: {png} does not exist "
                               f"(the record names {entry.get('path')})")
            png_paths.append(png)
        else:  # in-RAM container: (image, bd label, original label)
            img, bd_label, original = entry[0], int(entry[1]), int(entry[2])
            poisoned.images.append(_to_chw_uint8(img, f"{source}: {where} index {pos}"))
        poisoned.positions.append(pos)
        poisoned.bd_labels.append(bd_label)
        poisoned.original_labels.append(original)
    if png_paths:
        poisoned.images = _read_pngs(png_paths)
    return order, poisoned


# ------------------------------------------------------------------------------------------ v1


def _read_v1_split(state: Any, where: str, clean: ImageData, source: str, test: bool) -> tuple[np.ndarray, _Poisoned]:
    _require(state, ("x", "y", "original_index"), where, source)
    if state["x"] is None:  # an attack without training-set poisoning
        return np.arange(len(clean)), _Poisoned([], [], [], [])
    positions = _index_array(state["original_index"], f"{where}.original_index", source)
    indicator = state.get("poison_indicator")
    if indicator is not None and len(positions) != len(state["y"]):
        # BackdoorBench v1's loader: an index list of every sample, cut down to the poisoned ones
        positions = positions[np.nonzero(np.asarray(indicator) == 1)[0]]
    xs, ys = state["x"], np.asarray(state["y"]).reshape(-1)
    if not len(xs) == len(ys) == len(positions):
        raise CGDError(f"{source}: {where}.x, .y and .original_index have different lengths "
                       f"({len(xs)}, {len(ys)}, {len(positions)})")
    if len(positions) and (positions.min() < 0 or positions.max() >= len(clean)):
        raise CGDError(f"{source}: {where}.original_index holds indices outside 0..{len(clean) - 1}")
    if test:
        originals = (np.asarray(state["original_targets"]).reshape(-1).tolist() if state.get("original_targets")
                     is not None else clean.labels[torch.as_tensor(positions)].tolist())
    else:  # v1 bd_train keeps no original labels: the clean split's are the originals
        originals = clean.labels[torch.as_tensor(positions, dtype=torch.long)].tolist()
    images = [_to_chw_uint8(x, f"{source}: {where}.x[{i}]") for i, x in enumerate(xs)]
    poisoned = _Poisoned([int(p) for p in positions], images, [int(y) for y in ys], [int(o) for o in originals])
    order = positions if test else np.arange(len(clean))
    return order, poisoned


# ------------------------------------------------------------------------------------------ assembly


def _true_poison_split(attack: str, info: dict, bd: torch.Tensor, original: torch.Tensor,
                       modified: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(poison_mask, cross_mask). WaNet/Input-Aware store cross samples as poisoned with their
    original label: there, only bd label != original label marks the backdoor. Everywhere else
    (incl. clean-label attacks, whose poisons keep their label) every stored sample is a poison."""
    has_cross = attack.lower() in CROSS_SAMPLE_ATTACKS or float(info.get("cross_ratio") or 0) > 0
    if not has_cross:
        return modified.clone(), torch.zeros_like(modified)
    changed = bd != original
    return modified & changed, modified & ~changed


def _assemble_train(order: np.ndarray, poisoned: _Poisoned, clean: ImageData, attack: str, info: dict,
                    target: int | None) -> PoisonedData:
    positions = torch.as_tensor(order, dtype=torch.long)
    where_in = {int(p): i for i, p in enumerate(order)}
    images = clean.images[positions].clone()
    labels = clean.labels[positions].clone()
    original = clean.labels[positions].clone()
    modified = torch.zeros(len(positions), dtype=torch.bool)
    for pos, img, bd, orig in zip(poisoned.positions, poisoned.images, poisoned.bd_labels, poisoned.original_labels):
        if pos in where_in:  # poisoned samples outside the subset are not part of bd_train
            i = where_in[pos]
            images[i], labels[i], original[i], modified[i] = img, bd, orig, True
    poison_mask, cross_mask = _true_poison_split(attack, info, labels, original, modified)
    return PoisonedData(images, labels, original, poison_mask, cross_mask, clean.classes, attack,
                        -1 if target is None else int(target))


def _assemble_triggered(order: np.ndarray, poisoned: _Poisoned, clean: ImageData) -> TriggeredTest:
    positions = torch.as_tensor(order, dtype=torch.long)
    images = clean.images[positions].clone()
    attack_labels = clean.labels[positions].clone()
    true_labels = clean.labels[positions].clone()
    lookup = {p: i for i, p in enumerate(poisoned.positions)}
    for i, pos in enumerate(order.tolist()):
        if pos in lookup:
            j = lookup[pos]
            images[i], attack_labels[i], true_labels[i] = (poisoned.images[j], poisoned.bd_labels[j],
                                                          poisoned.original_labels[j])
    return TriggeredTest(images, true_labels, attack_labels, positions)


def _attack_facts(info: dict) -> tuple[str, int | None, float | None, str]:
    """(attack name, target, poison ratio, label mode) from info.pickle; v1 WaNet/Input-Aware
    scripts wrote no `attack` key, so their own arguments identify them."""
    name = info.get("attack")
    if not name:
        name = "wanet" if "cross_ratio" in info else "inputaware" if "mask_density" in info else "unknown"
    target = info.get("attack_target", info.get("target_label"))
    ratio = info.get("pratio")
    mode = info.get("attack_label_trans", info.get("attack_mode", "all2one"))
    return (str(name), None if target is None else int(target), None if ratio is None else float(ratio),
            str(mode).strip())


def _build_model(raw: dict, num_classes: int, source: str) -> tuple[Classifier, str, str]:
    exported = raw.get(CGD_BENCH_KEY) or {}
    model_name = str(raw["model_name"])
    arch = exported.get("arch") or MODEL_FROM_BB.get(model_name)
    if arch is None or not is_model(arch):
        known = ", ".join(sorted(MODEL_FROM_BB))
        kind = "a BackdoorBench architecture" if model_name in BB_ARCHITECTURES else "not a BackdoorBench architecture"
        raise CGDError(f"{source}: model '{model_name}' ({kind}) has no counterpart in cgd-bench's model registry; "
                       f"records with these architectures can be imported: {known} (cgd-bench models: "
                       f"{', '.join(list_models())})")
    state = raw["model"]
    if not isinstance(state, dict):
        raise CGDError(f"{source}: 'model' should be a state dict, got {type(state).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    net = create_model(arch, num_classes)
    expected = list(net.state_dict())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CGDError(f"{source}: the 'model' state dict does not fit cgd-bench's '{arch}' with {num_classes} "
                       f"classes: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                       f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CGDError(f"{source}: the 'model' state dict does not fit cgd-bench's '{arch}': "
                       f"{str(exc).splitlines()[-1].strip()}") from None
    if exported.get("mean") is not None:
        mean, std = tuple(exported["mean"]), tuple(exported["std"])
    else:
        mean, std = BB_NORMALIZATION[str(raw["clean_data"])]
    return Classifier(net, mean, std, arch=arch).eval(), model_name, arch


def state_dict_digest(model: Classifier) -> str:
    h = hashlib.sha256()
    for k, v in model.net.state_dict().items():
        h.update(k.encode())
        h.update(tensor_digest(v).encode())
    return h.hexdigest()


def record_folder(path: str | os.PathLike) -> Path:
    """The record folder, given it or its attack_result.pt."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == ATTACK_RESULT:
        path = path.parent
    if not (path / ATTACK_RESULT).is_file():
        raise CGDError(f"{path}: not a BackdoorBench record folder (no {ATTACK_RESULT})")
    return path.resolve()


def load_attack_result(record_dir: str | os.PathLike, trust: bool = False) -> dict:
    """The raw attack_result.pt dict, safely loaded and checked for BackdoorBench's required keys."""
    path = record_folder(record_dir) / ATTACK_RESULT
    raw = load_pickled(path, trust=trust)
    _require(raw, RECORD_KEYS, "", str(path))
    return raw


def read_record(record_dir: str | os.PathLike, data_root: str | os.PathLike | None = None, trust: bool = False,
                cache: Cache | None = None) -> BackdoorBenchRecord:
    """Import a BackdoorBench record (v2 main-branch or v1). `data_root` holds the clean dataset;
    default: the record's own `data_path` rebuilt under its checkout, else $CGD_DATA_ROOT."""
    record_dir = record_folder(record_dir)
    source = str(record_dir / ATTACK_RESULT)
    raw = load_attack_result(record_dir, trust)
    info_path = record_dir / INFO_FILE
    info = load_pickled(info_path, trust=trust) if info_path.is_file() else {}
    if not isinstance(info, dict):
        raise CGDError(f"{info_path}: expected a dict of the attack's arguments, got {type(info).__name__}")
    if not info:
        log.warning("%s: no %s; attack name, target and ratio are unknown", record_dir, INFO_FILE)
    dataset = our_dataset(str(raw["clean_data"]), source)
    root = _choose_data_root(record_dir, raw, data_root)
    cache = cache or Cache()
    clean_train = load_split(dataset, root, True, cache=cache)
    clean_test = load_split(dataset, root, False, cache=cache)
    exported = raw.get(CGD_BENCH_KEY)
    if isinstance(exported, dict) and exported.get("clean_train_digest"):
        for name, split in (("train", clean_train), ("test", clean_test)):
            digest = tensor_digest(split.images) + tensor_digest(split.labels)
            if digest != exported[f"clean_{name}_digest"]:
                raise CGDError(f"{source}: the clean {name} split under {root} differs from the one this record "
                               f"was exported from ({exported.get('data_root')}); pass --data-root pointing at it")
    num_classes = int(raw["num_classes"])
    if num_classes != clean_train.num_classes:
        raise CGDError(f"{source}: num_classes is {num_classes} but {dataset} under {root} has "
                       f"{clean_train.num_classes} classes")

    attack, target, ratio, mode = _attack_facts(info)
    bd_train, bd_test = raw["bd_train"], raw["bd_test"]
    if isinstance(bd_test, dict) and "bd_data_container" in bd_test:
        fmt = "v2"
        if bd_train is None:
            train_order, train_poisoned = np.arange(len(clean_train)), _Poisoned([], [], [], [])
        else:
            train_order, train_poisoned = _read_v2_split(bd_train, "bd_train", BD_TRAIN_FOLDER, clean_train,
                                                         record_dir, source)
        test_order, test_poisoned = _read_v2_split(bd_test, "bd_test", BD_TEST_FOLDER, clean_test, record_dir, source)
    elif isinstance(bd_test, dict) and "x" in bd_test:
        fmt = "v1"
        train_order, train_poisoned = (_read_v1_split(bd_train, "bd_train", clean_train, source, test=False)
                                       if bd_train is not None else (np.arange(len(clean_train)),
                                                                     _Poisoned([], [], [], [])))
        _require(bd_test, ("original_index",), "bd_test", source)
        test_order, test_poisoned = _read_v1_split(bd_test, "bd_test", clean_test, source, test=True)
    else:
        raise CGDError(f"{source}: bd_test has neither 'bd_data_container' (v2 record) nor 'x' (v1 record)")

    for where, poisoned, clean in (("bd_train", train_poisoned, clean_train), ("bd_test", test_poisoned, clean_test)):
        _check_image_size(poisoned.images, poisoned.positions, clean, f"{source}: {where}")
        if fmt == "v2" or where == "bd_test":
            _check_original_labels(poisoned.positions, poisoned.original_labels, clean, f"{source}: {where}", root)

    model, model_name, arch = _build_model(raw, num_classes, source)
    return BackdoorBenchRecord(
        path=record_dir, format=fmt, attack=attack, target=target, ratio=ratio, label_mode=mode, dataset=dataset,
        model_name=model_name, arch=arch, num_classes=num_classes,
        train=_assemble_train(train_order, train_poisoned, clean_train, attack, info, target),
        train_indices=torch.as_tensor(train_order, dtype=torch.long), n_full_train=len(clean_train),
        test=clean_test, triggered=_assemble_triggered(test_order, test_poisoned, clean_test),
        model=model, state_dict_digest=state_dict_digest(model), data_root=root, info=info,
        exported_by=exported if isinstance(exported, dict) else None,
    )
