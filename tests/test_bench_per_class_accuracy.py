"""bench/per_class_accuracy.py: the per-class report on a hand-built case, and the script at smoke."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cgd_defense.config import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "bench" / "per_class_accuracy.py"


def test_per_class_report_on_a_hand_built_confusion(load_script):
    # class 0 (the target): 4 images, 2 right, 1 taken for b, 1 for c; class 1: 2 images, 1 called the
    # target; class 2: 2 images, both right
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2])
    per_class_report = load_script(SCRIPT).per_class_report
    r = per_class_report(predictions, labels, ["a", "b", "c"], target=0)
    assert r["clean_acc"] == pytest.approx(5 / 8)
    assert r["per_class_acc"] == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert r["others_called_target"] == pytest.approx(1 / 4)
    assert r["target_images_predicted_as"] == {"a": 0.5, "b": 0.25, "c": 0.25}
    assert "target" not in per_class_report(predictions, labels, ["a", "b", "c"], target=None)


def test_script_reports_every_class_of_the_clean_and_attacked_models(mini_root, session_cache_dir, tmp_path):
    out = tmp_path / "per_class.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--data-root", str(mini_root),
                           "--cache-dir", str(session_cache_dir), "--attacks", "sig", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"clean", "sig"}
    for r in report["models"].values():
        assert list(r["per_class_acc"]) == report["classes"]
        # overall accuracy is the per-class accuracies weighted by class counts, within rounding
        assert min(r["per_class_acc"].values()) - 1e-3 <= r["clean_acc"] <= max(r["per_class_acc"].values()) + 1e-3
    sig = report["models"]["sig"]
    assert sig["target"] == report["classes"][0]
    assert sum(sig["target_images_predicted_as"].values()) == pytest.approx(1, abs=1e-3)
    assert "airplane" in proc.stdout
