"""bench/defense_cost.py: one real smoke-sized measurement, and `--resume` finishing a comparison in a
later sitting without mixing machines or settings."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cgd_defense.config import PROJECT_ROOT
from cgd_defense.harness.provenance import machine

SCRIPT = PROJECT_ROOT / "bench" / "defense_cost.py"


def _run(mini_root, cache_dir, out, *extra):
    cmd = [sys.executable, str(SCRIPT), "--preset", "smoke", "--data-root", str(mini_root), "--cache-dir",
           str(cache_dir), "--attacks", "badnets", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def measured(mini_root, tmp_path_factory):
    """One finished sitting: ABL on the smoke BadNets set."""
    tmp = tmp_path_factory.mktemp("defense-cost")
    out = tmp / "report.json"
    proc = _run(mini_root, tmp / "cache", out, "--defenses", "abl")
    assert proc.returncode == 0, proc.stderr
    return tmp, out, json.loads(out.read_text())


def test_a_sitting_records_the_row_with_its_machine_and_commit(measured):
    _, _, report = measured
    (row,) = report["rows"]
    assert (row["attack"], row["defense"]) == ("badnets", "abl") and row["wall_s"] > 0
    assert row["machine"] == machine() and row["machine"]["cpu_model"]
    assert row["git_commit"] == report["runs"][0]["git_commit"] and len(report["runs"]) == 1
    assert set(row["stage_times"]) == {"isolation", "finetune", "unlearning"}


def test_resume_keeps_finished_rows_and_runs_nothing_again(measured, mini_root):
    tmp, out, first = measured
    proc = _run(mini_root, tmp / "cache", out, "--defenses", "abl", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "badnets/abl" in proc.stdout and "kept from an earlier sitting" in proc.stdout
    report = json.loads(out.read_text())
    assert report["rows"] == first["rows"]  # the same measurement, not a new one
    assert len(report["runs"]) == 2 and report["runs"][1]["input_times_s"] == {}  # nothing was prepared or trained
    assert report["runs"][0] == first["runs"][0]


def test_resume_keeps_the_rows_of_defenses_this_sitting_does_not_name(measured, mini_root, tmp_path):
    """A comparison finished over sittings that each run part of it (`--defenses dbd --resume`)."""
    from cgd_defense.registry import create_defense

    tmp, out, first = measured
    report = json.loads(out.read_text())
    (abl,) = report["rows"]
    asd = {**abl, "defense": "asd", "params": create_defense("asd", preset="smoke").get_params(),
           "stage_times": {"seeds": 0.1, "split": 2.0, "mixmatch": 3.0}, "wall_s": 5.5}
    report["rows"] = [asd, abl]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(report))
    proc = _run(mini_root, tmp / "cache", partial, "--defenses", "abl", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "badnets/asd: 5.5 s (kept" in proc.stdout and "badnets/abl" in proc.stdout
    after = json.loads(partial.read_text())
    assert after["rows"] == [asd, abl]
    assert {(r["attack"], r["defense"]) for r in after["projection"]["rows"]} == {("badnets", "asd"), ("badnets", "abl")}
    # ASD at smoke: 3 epochs, one of them a meta-split of half a virtual epoch, 4 MixMatch steps of 32 each
    factors = next(r for r in after["projection"]["rows"] if r["defense"] == "asd")["stage_factors"]
    assert factors["split"] == pytest.approx((120 + 2 * 30) / (3 + 2 * 1 * 0.5))
    assert factors["mixmatch"] == pytest.approx(120 * 1024 * 64 / (3 * 4 * 32))


def test_without_resume_the_report_is_measured_afresh(measured, mini_root, tmp_path):
    tmp, out, first = measured
    fresh = tmp_path / "fresh.json"
    fresh.write_text(out.read_text())
    proc = _run(mini_root, tmp / "cache", fresh, "--defenses", "abl")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(fresh.read_text())
    assert "kept" not in proc.stdout and len(report["runs"]) == 1
    assert report["rows"][0]["finished_at"] >= first["rows"][0]["finished_at"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["rows"][0]["machine"].update(cpu_model="Some Other CPU"), "wall times from two machines"),
    (lambda r: r.update(preset="quick"), "has preset 'quick', this run 'smoke'"),
])
def test_resume_refuses_another_machine_or_other_settings(measured, mini_root, tmp_path, change, message):
    tmp, out, _ = measured
    report = json.loads(out.read_text())
    change(report)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report))
    proc = _run(mini_root, tmp / "cache", other, "--defenses", "abl", "--resume")
    assert proc.returncode != 0 and message in proc.stderr and str(other) in proc.stderr
    assert json.loads(other.read_text()) == report  # left as it was


def test_the_report_projects_each_stage_to_the_paper_schedule(measured):
    _, _, report = measured
    (row,) = report["rows"]
    (projected,) = report["projection"]["rows"]
    assert report["projection"]["preset"] == "paper"
    # ABL at smoke (registry.yaml): isolation 1, fine-tuning 0.5, unlearning 2 epochs; the paper's 20 / 60 / 5
    assert projected["stage_factors"] == {"isolation": 20.0, "finetune": 120.0, "unlearning": 2.5}
    outside_stages = row["wall_s"] - sum(row["stage_times"].values())
    expected = outside_stages + sum(t * projected["stage_factors"][s] for s, t in row["stage_times"].items())
    assert projected["wall_s"] == pytest.approx(expected, abs=0.1)


def test_projection_leaves_out_rows_whose_stages_are_undeclared(load_script):
    defense_cost = load_script(SCRIPT)

    params = {"isolation_epochs": 1, "finetune_epochs": 2.4}
    row = {"attack": "badnets", "defense": "abl", "wall_s": 100.0, "n_train": 1000, "params": params,
           "stage_times": {"isolation": 30.0, "finetune": 60.0, "unlearning": 5.0}}
    (abl,) = defense_cost.projected([row], "paper")["rows"]
    assert abl["wall_s"] == pytest.approx(5.0 + 30 * 20 + 60 * 25 + 5 * 1)
    unknown_stage = {**row, "stage_times": {**row["stage_times"], "something_else": 1.0}}
    assert defense_cost.projected([unknown_stage, {"attack": "badnets", "defense": "cgd", "error": "x"}],
                                  "paper")["rows"] == []


def test_an_unknown_projection_preset_is_refused_before_any_work(mini_root, tmp_path):
    out = tmp_path / "report.json"
    proc = _run(mini_root, tmp_path / "cache", out, "--defenses", "abl", "--project-to", "papper")
    assert proc.returncode == 2 and "unknown preset 'papper'" in proc.stderr and "Did you mean 'paper'" in proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()
