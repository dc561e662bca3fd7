"""Dataset registry: the paper's four datasets, decoded once into uint8 tensors and cached.

Each dataset is described by a `DatasetInfo` (classes, size, normalisation, how to find and read
its files). `load_split(name, root, train)` returns an `ImageData` (uint8 N x 3 x H x W + labels);
decoded tensors are cached under a hash of the file listing (names, sizes, mtimes), so the JPEG/PPM
decoding cost is paid once. Missing data raises one error naming where we looked and the remedy.
"""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..config import unknown_name_error
from ..errors import CGDError
from ..harness.cache import Cache

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp"}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class ImageData:
    """An in-memory image classification set: uint8 images (N, 3, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices) -> "ImageData":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageData(self.images[indices], self.labels[indices], self.classes)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    find: Callable[[Path], tuple[Path, str] | None]  # (dataset dir, layout) or None
    read: Callable[[Path, str, bool], tuple[np.ndarray, np.ndarray, list[str]]]
    layouts_help: str
    aliases: tuple[str, ...] = ()
    download: Callable[[Path], None] | None = None
    extra: dict = field(default_factory=dict)


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    if info.name in _DATASETS:
        raise ValueError(f"dataset '{info.name}' is already registered")
    _DATASETS[info.name] = info
    return info


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    if name not in _DATASETS:
        raise unknown_name_error("dataset", name, _DATASETS)
    return _DATASETS[name]


# ---------------------------------------------------------------------------------------------
# Reading helpers


def _decode(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _decode_all(paths: list[Path], size: int) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for i, arr in enumerate(pool.map(lambda p: _decode(p, size), paths, chunksize=256)):
            out[i] = arr
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image_folder(split_dir: Path, classes: list[str] | None, size: int):
    """`split_dir/<class>/*.jpg`; class index follows `classes` (or sorted folder names)."""
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if classes is None:
        classes = folders
    missing = [c for c in classes if c not in folders]
    if missing:
        raise CGDError(f"{split_dir}: missing class folders {missing}; expected one folder per class: {classes}")
    paths, labels = [], []
    for idx, cls in enumerate(classes):
        files = _image_files(split_dir / cls)
        paths += files
        labels += [idx] * len(files)
    return _decode_all(paths, size), np.asarray(labels, dtype=np.int64), list(classes)


def _unpickle(path: Path) -> dict:
    # torchvision's CIFAR batches are pickles of plain numpy data; read them as the official loader does.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100


def _find_cifar(root: Path, batches_dir: str, subdirs: tuple[str, ...]):
    for cand in [root, *(root / s for s in subdirs)]:
        if (cand / batches_dir).is_dir():
            return cand / batches_dir, "torchvision"
        if cand.name == batches_dir and cand.is_dir():
            return cand, "torchvision"
        if (cand / "train").is_dir() and (cand / "test").is_dir() and batches_dir.startswith("cifar-10-"):
            return cand, "image-folder"
    return None


def _read_cifar10(path: Path, layout: str, train: bool):
    if layout == "image-folder":
        return _read_image_folder(path / ("train" if train else "test"), CIFAR10_CLASSES, 32)
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in files:
        entry = _unpickle(path / name)
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
    meta = _unpickle(path / "batches.meta")
    return np.concatenate(xs), np.concatenate(ys), list(meta["label_names"])


def _read_cifar100(path: Path, layout: str, train: bool):
    entry = _unpickle(path / ("train" if train else "test"))
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(entry["fine_labels"], dtype=np.int64)
    classes = list(_unpickle(path / "meta")["fine_label_names"])
    return x, y, classes


def _torchvision_download(cls_name: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, cls_name)(str(root), train=True, download=True)
        getattr(tvd, cls_name)(str(root), train=False, download=True)

    return download


# ---------------------------------------------------------------------------------------------
# GTSRB (German Traffic Sign Recognition Benchmark), public per-image layout


GTSRB_NUM_CLASSES = 43


def _find_gtsrb(root: Path):
    for cand in [root, root / "GTSRB", root / "gtsrb", root / "gtsrb" / "GTSRB"]:
        if (cand / "Final_Training" / "Images").is_dir():
            return cand, "gtsrb-final"
    return None


def _read_gtsrb(path: Path, layout: str, train: bool):
    classes = [f"{i:05d}" for i in range(GTSRB_NUM_CLASSES)]
    if train:
        base = path / "Final_Training" / "Images"
        paths, labels = [], []
        for idx, cls in enumerate(classes):
            if (base / cls).is_dir():
                files = _image_files(base / cls)
                paths += files
                labels += [idx] * len(files)
    else:
        base = path / "Final_Test" / "Images"
        gt = path / "Final_Test" / "GT-final_test.csv"
        if not gt.is_file():
            gt = base / "GT-final_test.csv"
        if not gt.is_file():
            raise CGDError(f"GTSRB test labels not found: expected {path / 'Final_Test' / 'GT-final_test.csv'}")
        with open(gt, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
        paths = [base / r["Filename"] for r in rows]
        labels = [int(r["ClassId"]) for r in rows]
    return _decode_all(paths, 32), np.asarray(labels, dtype=np.int64), classes


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet-200 (64 x 64); its labelled `val` split serves as the test set, as is standard


def _find_tiny(root: Path):
    for cand in [root, root / "tiny-imagenet-200", root / "tinyimagenet" / "tiny-imagenet-200"]:
        if (cand / "wnids.txt").is_file() and (cand / "train").is_dir():
            return cand, "tiny-imagenet-200"
    return None


def _read_tiny(path: Path, layout: str, train: bool):
    wnids = [w.strip() for w in (path / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    if train:
        paths, labels = [], []
        for w in wnids:
            folder = path / "train" / w / "images"
            files = _image_files(folder) if folder.is_dir() else []
            paths += files
            labels += [index[w]] * len(files)
    else:
        ann = path / "val" / "val_annotations.txt"
        rows = [line.split("\t") for line in ann.read_text().splitlines() if line.strip()]
        paths = [path / "val" / "images" / r[0] for r in rows]
        labels = [index[r[1]] for r in rows]
    return _decode_all(paths, 64), np.asarray(labels, dtype=np.int64), wnids


# ---------------------------------------------------------------------------------------------

register_dataset(DatasetInfo(
    name="cifar10", title="CIFAR-10", num_classes=10, image_size=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    find=lambda root: _find_cifar(root, "cifar-10-batches-py", ("cifar10", "cifar-10", "CIFAR10")),
    read=_read_cifar10,
    layouts_help="train/<class>/*.jpg + test/<class>/*.jpg, or torchvision's cifar-10-batches-py/",
    download=_torchvision_download("CIFAR10"),
))
register_dataset(DatasetInfo(
    name="cifar100", title="CIFAR-100", num_classes=100, image_size=32,
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    find=lambda root: _find_cifar(root, "cifar-100-python", ("cifar100", "cifar-100", "CIFAR100")),
    read=_read_cifar100,
    layouts_help="torchvision's cifar-100-python/ (train, test, meta)",
    download=_torchvision_download("CIFAR100"),
))
register_dataset(DatasetInfo(
    name="gtsrb", title="GTSRB", num_classes=GTSRB_NUM_CLASSES, image_size=32,
    mean=(0.3403, 0.3121, 0.3214), std=(0.2724, 0.2608, 0.2669),
    find=_find_gtsrb, read=_read_gtsrb,
    layouts_help="GTSRB/Final_Training/Images/000NN/*.ppm + GTSRB/Final_Test/Images/*.ppm with GT-final_test.csv",
))
register_dataset(DatasetInfo(
    name="tinyimagenet", title="Tiny-ImageNet-200", num_classes=200, image_size=64,
    mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821),
    find=_find_tiny, read=_read_tiny, aliases=("tiny",),
    layouts_help="tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt",
))


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """`--data-root`, else the CGD_DATA_ROOT environment variable."""
    root = root or os.environ.get("CGD_DATA_ROOT")
    if not root:
        raise CGDError("no data root given: pass --data-root DIR or set CGD_DATA_ROOT")
    return Path(root).expanduser().resolve()


def _listing_signature(path: Path) -> str:
    """Hash of every file's relative name, size and mtime under `path`: changes when data changes."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def locate(name: str, root: str | os.PathLike | None, download: bool = False) -> tuple[Path, str]:
    info = get_dataset_info(name)
    root = resolve_data_root(root)
    found = info.find(root)
    if found is None and download:
        if info.download is None:
            raise CGDError(f"{info.title} cannot be downloaded automatically; place it under {root} ({info.layouts_help})")
        info.download(root)
        found = info.find(root)
    if found is None:
        remedy = "pass --data-root DIR pointing at it" + (" or --download" if info.download else "")
        raise CGDError(f"no {info.title} data found under {root} (expected {info.layouts_help}); {remedy}")
    return found


def load_split(name: str, root: str | os.PathLike | None, train: bool, cache: Cache | None = None,
               download: bool = False) -> ImageData:
    """Load the train or test split of a registered dataset as uint8 tensors, decoding once."""
    info = get_dataset_info(name)
    path, layout = locate(name, root, download=download)
    cache = cache or Cache()

    def compute():
        x, y, classes = info.read(path, layout, train)
        if len(y) == 0:
            raise CGDError(f"{path}: no images found for the {'train' if train else 'test'} split ({info.layouts_help})")
        return {"images": torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                "labels": torch.from_numpy(y), "classes": classes}

    spec = {"dataset": name, "layout": layout, "path": str(path), "train": train,
            "listing": _listing_signature(path), "format": 1}
    payload = cache.get_or_compute("decoded", spec, compute)
    return ImageData(payload["images"], payload["labels"], list(payload["classes"]))
