"""bench/grid_wall_time.py: the whole-grid projection on a hand-built results database (no training)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from cgd_defense.config import PROJECT_ROOT
from cgd_defense.leaderboard.db import ResultsDB
from cgd_defense.leaderboard.grid import load_plan

SCRIPT = PROJECT_ROOT / "bench" / "grid_wall_time.py"
GRID = """
    preset: smoke
    datasets: [cifar10]
    seeds: [0]
    attacks: [clean, badnets]
    defenses: [none, {name: fp, options: {clean_source: [oracle]}}, {name: nad, options: {clean_source: [oracle]}}]
"""
# (attack, defense label) -> (victim training s, defense s, total s, peak GPU MB); absent: still pending
TIMES = {
    ("clean", "none"): (100.0, 0.0, 110.0, None),
    ("badnets", "none"): (120.0, 0.0, 150.0, None),  # 30 s beyond the stages: 20 s of trigger fit + 10 s overhead
    ("clean", "fp[clean_source=oracle]"): (0.2, 40.0, 50.2, None),
    ("badnets", "fp[clean_source=oracle]"): (0.2, 5.0, 15.2, 2048.0),  # ran on a GPU: not a CPU measurement
}


@pytest.fixture()
def filled(tmp_path):
    grid = tmp_path / "walltime.yaml"
    grid.write_text(textwrap.dedent(GRID))
    plan = load_plan(grid)
    db = ResultsDB(tmp_path / "results.sqlite")
    db.register(plan.spec.name, plan.jobs)
    for job in plan.jobs:
        if (job.attack, job.defense_label) not in TIMES:
            continue
        victim, defense, total, gpu = TIMES[(job.attack, job.defense_label)]
        result = {"clean_acc": 0.8, "stage_times": {"backdoor_training": victim, "defense": defense, "total": total}}
        db.record_result(job.key, result, peak_rss_mb=1000.0, peak_gpu_mb=gpu,
                         host="vm (NVIDIA H200)" if gpu else "vm (2 CPUs)", run_dir=None)
    return grid, plan, db


def test_projection_counts_each_victim_once_and_projects_pending_jobs(filled, load_script):
    _, plan, db = filled
    report = load_script(SCRIPT).project(plan.runnable, db.rows(status="done"))
    rows = {r["defense"]: r for r in report["rows"]}
    assert report["overhead_per_job_s"] == pytest.approx(10.0)  # median of 10, 30, 10 over the CPU jobs
    # victims 100 + 120, badnets' trigger fit 30 - 10
    assert rows["victims and trigger fits"]["total_s"] == pytest.approx(240.0)
    assert rows["none"]["measured"] == 2 and rows["none"]["total_s"] == pytest.approx(20.0)
    fp = rows["fp[clean_source=oracle]"]
    # the GPU-run badnets job is projected from the CPU-measured clean one: 2 x (40 + 10)
    assert (fp["measured"], fp["projected"], fp["total_s"]) == (1, 1, pytest.approx(100.0))
    nad = rows["nad[clean_source=oracle]"]
    assert (nad["unmeasured"], nad["total_s"]) == (2, 0.0)
    assert report["lower_bound"] and report["total_s"] == pytest.approx(360.0)
    assert report["hosts"] == ["vm (2 CPUs)"]


def test_unmeasured_defense_falls_back_to_a_cost_report(filled, tmp_path, load_script):
    _, plan, db = filled
    nad_params = next(j for j in plan.jobs if j.defense == "nad").resolved["defense_params"]
    other = {**nad_params, "epochs": 99}
    cost = tmp_path / "defense_cost_smoke.json"
    cost.write_text(json.dumps({"preset": "smoke", "rows": [
        {"defense": "nad", "wall_s": 30.0, "params": other},
        {"defense": "nad", "wall_s": 70.0, "params": nad_params},
        {"defense": "nad", "wall_s": 1.0, "params": nad_params, "preset": "quick"}]}))  # another preset: ignored
    module = load_script(SCRIPT)
    fallback = module.cost_file_estimates("smoke", tmp_path)
    assert [r["wall_s"] for r in fallback["nad"]] == [30.0, 70.0]
    report = module.project(plan.runnable, db.rows(status="done"), fallback)
    nad = {r["defense"]: r for r in report["rows"]}["nad[clean_source=oracle]"]
    # the run with the jobs' own parameters, not the first one listed: 2 x (70 + 10)
    assert (nad["projected"], nad["total_s"], nad["estimate_from"]) == (2, pytest.approx(160.0), cost.name)
    assert not report["lower_bound"] and report["total_s"] == pytest.approx(520.0)
    # with only a run of other parameters, that one is used and the difference is named
    seconds, source = module.fallback_estimate(plan.runnable[-1], fallback["nad"][:1])
    assert seconds == 30.0 and source == f"{cost.name}, a run with other parameters: epochs 99 (grid: {nad_params['epochs']})"


def test_script_prints_the_table_and_writes_its_report(filled, tmp_path):
    grid, _, db = filled
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--grid", str(grid), "--db", str(db.path), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "whole grid: 0.10 h (lower bound: some jobs unmeasured)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["grid"] == "walltime" and report["jobs"] == 6 and report["total_s"] == pytest.approx(360.0)
