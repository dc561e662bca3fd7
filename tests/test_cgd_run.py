"""CGD end to end through the harness on cifar10-mini (smoke preset, shortened schedules)."""
import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_cgd_smoke_run_writes_split_metrics_and_entropy_map(mini_root, session_cache_dir, tmp_path):
    from cgd_defense.harness.pipeline import RunConfig, run

    out = tmp_path / "badnets-cgd"
    cfg = RunConfig(dataset="cifar10", data_root=str(mini_root), attack="badnets", defense="cgd", preset="smoke",
                    defense_params={"variant": "reference", "suspicious_epochs": 1, "retrain_epochs": 1},
                    cache_dir=str(session_cache_dir))
    result = run(cfg, out)
    split = result["split"]
    assert split["n_clean_part"] + split["n_suspect_part"] + split["n_rest"] == result["data"]["n_train"]
    for key in ("suspect_tpr", "suspect_fpr", "clean_part_poison_rate", "auroc_clip_nll",
                "auroc_suspicious_neg_nll", "auroc_combined"):
        assert split[key] is not None, key
    assert 0.5 < split["auroc_combined"] <= 1.0  # better than chance even at this size
    info = result["defense_info"]
    assert info["clip_source"] == "stand-in CLIP" and info["thresholds"]["sigma1"] == 0.2
    assert {"defense.clip_scoring", "defense.suspicious_training", "defense.retraining"} <= set(result["stage_times"])
    clip = result["clip_info"]  # the CLIP's provenance in full, for the leaderboard
    assert clip["label"] == clip["source"]["label"] == "stand-in CLIP" and clip["spec"] == "standin:cifar10"
    assert len(clip["identity"]) == 64 and clip["identity"] == clip["source"]["weights_sha256"]
    assert clip["prompts"][0] == "a photo of a airplane" and len(clip["prompts"]) == 10
    assert (clip["calibration"], clip["teacher_scale"]) == ("cosine", 1.0)
    assert json.loads((out / "result.json").read_text())["split"] == split
    log = (out / "run.log").read_text()  # the stages, as they ran
    assert "run: cifar10/badnets/cgd, preset smoke" in log and "defense: done in" in log and "evaluate: done in" in log
    assert (out / "entropy_map.png").stat().st_size > 10_000
    saved = torch.load(out / "split.pt", weights_only=True)
    assert int(saved["ground_truth"]["poison_mask"].sum()) == result["data"]["n_poisoned_train"]
    assert torch.equal(saved["split"]["suspect"].sum(), torch.tensor(split["n_suspect_part"]))
