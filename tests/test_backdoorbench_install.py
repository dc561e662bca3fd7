"""Installing CGD into a BackdoorBench checkout writes only its files, refuses to overwrite anything
else, and uninstalling leaves the checkout byte-for-byte as before."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cgd_defense.backdoorbench import install, uninstall
from cgd_defense.backdoorbench.entry_point import EntryConfig
from cgd_defense.errors import CGDError


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A fake BackdoorBench checkout: the folders and a few files of its defense layout."""
    root = tmp_path / "BackdoorBench"
    files = {
        "defense/fp.py": "print('fine-pruning')\n",
        "defense/base.py": "class defense: pass\n",
        "config/defense/fp/cifar10.yaml": "epochs: 100\nlr: 0.01\n",
        "config/defense/index/cifar10_index.txt": "0\n5\n9\n",
        "utils/save_load_attack.py": "def load_attack_result(path): ...\n",
        "record/badnet_0_1/info.pickle": "not read here\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "data").mkdir()
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


def test_install_then_uninstall_restores_the_checkout_exactly(checkout):
    before = snapshot(checkout)
    report = install(checkout)
    assert sorted(report.written) == ["config/defense/cgd/cifar10.yaml", "config/defense/cgd/cifar100.yaml",
                                      "config/defense/cgd/gtsrb.yaml", "config/defense/cgd/tiny.yaml", "defense/cgd.py"]
    added = set(snapshot(checkout)) - set(before)
    assert added == {"defense/cgd.py", "config/defense/cgd/", "config/defense/cgd/.cgd-bench-manifest.json",
                     *(f"config/defense/cgd/{d}.yaml" for d in ("cifar10", "cifar100", "gtsrb", "tiny"))}
    assert all(snapshot(checkout)[k] == v for k, v in before.items())  # nothing existing touched
    config = yaml.safe_load((checkout / "config/defense/cgd/cifar10.yaml").read_text())
    assert EntryConfig.model_validate(config).preset == "paper"

    again = install(checkout)  # idempotent: same content, nothing rewritten
    assert again.written == [] and len(again.unchanged) == 5

    removed = uninstall(checkout)
    assert "defense/cgd.py" in removed and "config/defense/cgd/" in removed
    assert snapshot(checkout) == before


def test_changed_files_are_never_overwritten_or_removed(checkout):
    before = snapshot(checkout)
    install(checkout)
    settings = checkout / "config/defense/cgd/gtsrb.yaml"
    original = settings.read_bytes()
    settings.write_text("preset: quick\n")
    with pytest.raises(CGDError, match="config/defense/cgd/gtsrb.yaml changed since cgd-bench installed"):
        uninstall(checkout)
    with pytest.raises(CGDError, match="refusing to overwrite config/defense/cgd/gtsrb.yaml"):
        install(checkout)
    assert settings.read_text() == "preset: quick\n" and (checkout / "defense/cgd.py").is_file()
    settings.write_bytes(original)
    uninstall(checkout)
    assert snapshot(checkout) == before


def test_existing_user_file_blocks_install(checkout):
    (checkout / "defense/cgd.py").write_text("# someone else's cgd\n")
    before = snapshot(checkout)
    with pytest.raises(CGDError, match="refusing to overwrite defense/cgd.py"):
        install(checkout)
    assert snapshot(checkout) == before
    with pytest.raises(CGDError, match="no cgd-bench installation found"):
        uninstall(checkout)


def test_not_a_checkout(tmp_path):
    with pytest.raises(CGDError, match="does not look like a BackdoorBench checkout"):
        install(tmp_path)


def test_installed_entry_point_runs_with_backdoorbench_arguments(checkout):
    install(checkout)
    proc = subprocess.run([sys.executable, "defense/cgd.py", "--help"], cwd=checkout, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--result_file" in proc.stdout and "--yaml_path" in proc.stdout
    proc = subprocess.run([sys.executable, "defense/cgd.py", "--result_file", "missing_record"], cwd=checkout,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a BackdoorBench record folder" in proc.stderr
    uninstall(checkout)
