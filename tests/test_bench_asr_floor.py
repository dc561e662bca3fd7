"""bench/asr_floor.py at the smoke preset: the clean-data model scored against attacks' triggered test sets."""
from __future__ import annotations

import json
import subprocess
import sys

from cgd_defense.config import PROJECT_ROOT
from cgd_defense.harness.cache import Cache
from cgd_defense.harness.pipeline import RunConfig, prepare_data
from cgd_defense.harness.presets import get_preset
from cgd_defense.registry import create_attack


def test_asr_floor_scores_the_unpoisoned_model_on_each_triggered_test_set(mini_root, session_cache_dir, tmp_path):
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench" / "asr_floor.py"), "--preset", "smoke",
                           "--data-root", str(mini_root), "--cache-dir", str(session_cache_dir), "--models", "none",
                           "--attacks", "badnets", "sig", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    row = report["models"]["none"]
    assert 0.2 < row["clean_acc"] <= 1  # trained, well above the 10% of chance
    cfg = RunConfig(data_root=str(mini_root), attack="badnets", preset="smoke", cache_dir=str(session_cache_dir))
    test = prepare_data(cfg, get_preset("smoke"), create_attack("badnets"), Cache(cfg.cache_dir)).test
    non_target = int((test.labels != create_attack("badnets").poisoning.target).sum())
    for attack in ("badnets", "sig"):
        cell = row["attacks"][attack]
        assert cell["n_triggered"] == non_target  # all-to-one: every non-target test image, triggered
        assert 0 <= cell["asr"] and 0 <= cell["ra"] and cell["asr"] + cell["ra"] <= 1
    assert "badnets" in proc.stdout and "none" in proc.stdout
