"""bench/dbd_split_probe.py at the smoke preset: DBD's split rule scored on frozen backbones."""
from __future__ import annotations

import json
import subprocess
import sys

from cgd_defense.config import PROJECT_ROOT
from cgd_defense.harness.cache import Cache
from cgd_defense.harness.pipeline import RunConfig, prepare_data
from cgd_defense.harness.presets import get_preset
from cgd_defense.registry import create_attack


def test_probe_ranks_with_dbd_and_sees_the_trigger_only_in_the_backdoored_backbone(mini_root, session_cache_dir,
                                                                                   tmp_path):
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench" / "dbd_split_probe.py"), "--preset", "smoke",
                           "--data-root", str(mini_root), "--cache-dir", str(session_cache_dir),
                           "--simclr-epochs", "0.2", "--warmup-epochs", "0.2", "--no-supervised", "--victim",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["backbone"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"simclr-0.2", "victim"}
    cfg = RunConfig(data_root=str(mini_root), attack="badnets", preset="smoke", cache_dir=str(session_cache_dir))
    train = prepare_data(cfg, get_preset("smoke"), create_attack("badnets"), Cache(cfg.cache_dir)).train
    for r in rows.values():
        assert r["poison_rate"] == round(float(train.poison_mask.float().mean()), 4)
        assert r["target_label_share_all"] == round(float((train.labels == 0).float().mean()), 4)
        # DBD keeps half the set: at most all poisons, i.e. twice the poison rate
        assert 0 <= r["kept_poison_rate"] <= 2 * r["poison_rate"] + 1e-3 and 0 <= r["split_auroc"] <= 1
    # the backdoored model's features carry the patch; a fraction of a SimCLR epoch has learnt nothing of it
    assert rows["victim"]["trigger_probe_auroc"] > 0.9
    assert rows["victim"]["trigger_probe_auroc"] > rows["simclr-0.2"]["trigger_probe_auroc"] + 0.2
    assert "kept poison" in proc.stdout
