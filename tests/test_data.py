import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cgd_defense.data import CIFAR10, load_split, stratified_holdout
from cgd_defense.errors import CGDError
from cgd_defense.harness.cache import Cache


def _write_image_folder(root, classes, per_class, size=32, ext="png"):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.{ext}")


def test_cifar10_image_folder_layout_real_mini(mini_root, tmp_path):
    data = load_split("cifar10", mini_root, train=True, cache=Cache(tmp_path))
    assert data.images.shape == (5000, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.bincount().tolist() == [500] * 10
    assert data.classes[0] == "airplane" and data.classes[-1] == "truck"
    test = load_split("cifar10", mini_root, train=False, cache=Cache(tmp_path))
    assert len(test) == 2000


def test_cifar10_torchvision_layout(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(1)
    expected = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 4)]
        expected[name] = (x, y)
        with open(batches / name, "wb") as f:
            pickle.dump({"data": x, "labels": y}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["c%d" % i for i in range(10)]}, f)
    train = load_split("cifar10", tmp_path, train=True, cache=Cache(tmp_path / "cache"))
    test = load_split("cifar10", tmp_path, train=False, cache=Cache(tmp_path / "cache"))
    assert len(train) == 20 and len(test) == 4
    x0 = expected["data_batch_1"][0][0].reshape(3, 32, 32)
    assert torch.equal(train.images[0], torch.from_numpy(x0))
    assert test.labels.tolist() == expected["test_batch"][1]


def test_cifar100_torchvision_layout(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(2)
    for split, n in (("train", 6), ("test", 3)):
        with open(d / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(range(n))}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"k{i}" for i in range(100)]}, f)
    train = load_split("cifar100", tmp_path, True, cache=Cache(tmp_path / "c"))
    assert len(train) == 6 and train.num_classes == 100 and train.labels.tolist() == list(range(6))


def test_gtsrb_layout(tmp_path):
    root = tmp_path / "GTSRB"
    rng = np.random.default_rng(3)
    for cls in (0, 2):
        d = root / "Final_Training" / "Images" / f"{cls:05d}"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(d / f"00000_{i:05d}.ppm")
    test_dir = root / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, cls in enumerate((5, 42)):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(test_dir / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;32;32;0;0;31;31;{cls}")
    (root / "Final_Test" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    train = load_split("gtsrb", tmp_path, True, cache=Cache(tmp_path / "c"))
    test = load_split("gtsrb", tmp_path, False, cache=Cache(tmp_path / "c"))
    assert train.images.shape == (6, 3, 32, 32)  # resized to 32x32
    assert train.labels.tolist() == [0, 0, 0, 2, 2, 2] and train.num_classes == 43
    assert test.labels.tolist() == [5, 42]


def test_tinyimagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(4)
    for w in wnids:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    for i, w in enumerate(["n02", "n01", "n02"]):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n" for i, w in enumerate(["n02", "n01", "n02"])))
    train = load_split("tinyimagenet", tmp_path, True, cache=Cache(tmp_path / "c"))
    test = load_split("tinyimagenet", tmp_path, False, cache=Cache(tmp_path / "c"))
    assert train.images.shape == (4, 3, 64, 64) and train.labels.tolist() == [0, 0, 1, 1]
    assert test.labels.tolist() == [1, 0, 1]


def test_missing_data_root_error_names_path_and_remedy(tmp_path):
    with pytest.raises(CGDError, match=r"no CIFAR-10 data found under .*--data-root"):
        load_split("cifar10", tmp_path / "nowhere", True, cache=Cache(tmp_path))


def test_data_root_from_environment(mini_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CGD_DATA_ROOT", str(mini_root))
    assert len(load_split("cifar10", None, False, cache=Cache(tmp_path))) == 2000


def test_decoded_cache_invalidated_when_a_file_changes(tmp_path):
    _write_image_folder(tmp_path / "d", ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                          "ship", "truck"], 1)
    cache = Cache(tmp_path / "c")
    first = load_split("cifar10", tmp_path / "d", True, cache=cache)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "d" / "train" / "cat" / "0000.png")
    second = load_split("cifar10", tmp_path / "d", True, cache=cache)
    assert second.images[3].sum() == 0 and first.images[3].sum() > 0
    assert len(cache.misses) == 2


def test_torchvision_style_wrapper(mini_root, tmp_path):
    ds = CIFAR10(mini_root, train=False, transform=lambda x: x.float() / 255, cache=Cache(tmp_path))
    img, label = ds[0]
    assert img.dtype == torch.float32 and img.max() <= 1 and label == 0
    assert "Split: Test" in repr(ds) and ds.class_to_idx["truck"] == 9


def test_stratified_holdout_is_seeded_stratified_and_disjoint():
    labels = torch.arange(4).repeat_interleave(50)
    keep, held = stratified_holdout(labels, 0.1, seed=3)
    keep2, held2 = stratified_holdout(labels, 0.1, seed=3)
    assert torch.equal(held, held2) and torch.equal(keep, keep2)
    assert labels[held].bincount().tolist() == [5, 5, 5, 5]
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(keep) + len(held) == 200
