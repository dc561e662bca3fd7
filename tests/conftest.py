"""Shared fixtures: the real CIFAR-10 mini copy beside the project, an isolated cache, tiny data, and a
loader for the bench/ scripts."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from cgd_defense.config import PROJECT_ROOT
from cgd_defense.data import ImageData

MINI_ROOT = Path(os.environ.get("CGD_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data" / "cifar10-mini"))

os.environ.setdefault("CGD_PROGRESS", "0")


@pytest.fixture(scope="session")
def mini_root() -> Path:
    if not (MINI_ROOT / "train").is_dir():
        pytest.skip(f"cifar10-mini not found at {MINI_ROOT} (set CGD_TEST_DATA)")
    return MINI_ROOT


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole session, so end-to-end tests share decoded data and trained models."""
    return tmp_path_factory.mktemp("cgd-cache")


@pytest.fixture
def tiny_data() -> ImageData:
    """60 random 8x8 images, 3 classes of 20."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(3).repeat_interleave(20)
    return ImageData(images, labels, ["a", "b", "c"])


@pytest.fixture(scope="session")
def load_script():
    """Import a bench/ script (a file, not a package module) by its path, to test its functions."""
    def load(path: Path):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
