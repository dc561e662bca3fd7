"""How long a whole grid takes on one CPU machine, run job after job on a fresh cache: measured for
the jobs that ran, projected for the rest, from the per-job stage times in the results database.

    cgd-bench leaderboard import leaderboard/results.csv      # a fresh checkout: the committed results
    python bench/grid_wall_time.py --grid quick               # target: the `quick` grid in <= 3 hours

A job's recorded time splits into three parts (`stage_times` in the database):
- `backdoor_training`: the victim, trained by whichever job of an (attack, seed) ran first and read
  from the cache by the rest, so it is counted once per attack and seed;
- `defense`: the defense stage, counted for every job;
- the rest of `total`: loading the poisoned set and evaluating, plus, for the first job of a learned
  attack, fitting its trigger. The median of that rest over all measured jobs is each job's overhead;
  what an attack's slowest job spent beyond it is that attack's trigger fit, counted once.
Only jobs that ran on a CPU count as measurements (a job with a GPU's peak memory or a GPU host name
does not). A pending job is projected from the median defense stage of the measured jobs with the same
defense label at the grid's preset; a label no job has measured falls back to the wall time of that
defense in `bench/results/defense_cost_<preset>*.json` (`bench/defense_cost.py`): a run with the same
effective parameters if there is one, else a run of the same defense, with the parameters that differ
named in the table. A label with neither is reported as unmeasured, and the total is then a lower
bound. Projections assume the machine the measurements came from; the hosts they ran on are listed.
Prints a table, writes bench/results/grid_wall_time_<grid>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from cgd_defense.harness.cache import atomic_write_text
from cgd_defense.leaderboard.db import ResultsDB
from cgd_defense.leaderboard.grid import load_plan

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = {"quick": 3 * 3600}  # issue 9: the whole quick grid in <= 3 hours on the 2-core machine
VICTIM_TRAINED_S = 10.0  # a recorded backdoor_training above this trained the victim (a cache read takes < 1 s)


def ran_on_cpu(row: dict) -> bool:
    return row.get("peak_gpu_mb") is None and "NVIDIA" not in (row.get("host") or "")


def stage_parts(row: dict) -> tuple[float, float, float]:
    """(victim training, defense stage, the rest) of a finished job, in seconds."""
    times = row.get("stage_times") or {}
    victim = float(times.get("backdoor_training") or 0.0)
    defense = float(times.get("defense") or 0.0)
    total = float(times.get("total") or row.get("total_s") or 0.0)
    return victim, defense, max(0.0, total - victim - defense)


def cost_file_estimates(preset: str, results_dir: Path = RESULTS) -> dict[str, list[dict]]:
    """defense name -> its runs in `bench/defense_cost.py`'s reports at `preset`: wall s of `fit`,
    effective parameters, file."""
    found: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(results_dir.glob(f"defense_cost_{preset}*.json")):
        report = json.loads(path.read_text())
        for row in report.get("rows", []):
            if row.get("preset", report.get("preset")) == preset and row.get("wall_s") is not None:
                found[row["defense"]].append({"wall_s": float(row["wall_s"]), "params": row.get("params") or {},
                                              "source": path.name})
    return dict(found)


def fallback_estimate(job, runs: list[dict]) -> tuple[float, str] | None:
    """(seconds, where from) for `job` from the cost reports' runs of its defense: one with the job's
    effective parameters, else the first, naming the parameters in which it differs."""
    if not runs:
        return None
    params = job.resolved.get("defense_params") or {}
    for run in runs:
        if run["params"] == params:
            return run["wall_s"], run["source"]
    run = runs[0]
    differ = sorted(k for k in set(params) | set(run["params"]) if params.get(k) != run["params"].get(k))
    shown = ", ".join(k if isinstance(params.get(k), dict) else f"{k} {run['params'].get(k)} (grid: {params.get(k)})"
                      for k in differ)
    return run["wall_s"], f"{run['source']}, a run with other parameters: {shown}"


def project(jobs: list, measured: list[dict], fallback: dict[str, list[dict]] | None = None) -> dict:
    """Wall time of running `jobs` (a grid plan's, in order) one after another on a fresh cache.

    `measured`: finished jobs of the database at the grid's preset, from any grid (a job shared by
    two grids is one measurement). `fallback`: `cost_file_estimates`, for labels no job measured."""
    fallback = fallback or {}
    cpu_rows = [r for r in measured if ran_on_cpu(r)]
    parts: dict[str, tuple[float, float, float]] = {}
    defense_s: dict[str, list[float]] = defaultdict(list)
    victims: dict[str, list[float]] = defaultdict(list)
    rest: dict[str, list[float]] = defaultdict(list)
    for row in cpu_rows:
        victim, defense, other = parts[row["job_key"]] = stage_parts(row)
        defense_s[row["defense_label"]].append(defense)
        if victim > VICTIM_TRAINED_S:
            victims[row["attack_label"]].append(victim)
        rest[row["attack_label"]].append(other)
    overhead = statistics.median([p[2] for p in parts.values()]) if parts else 0.0
    all_victims = [v for values in victims.values() for v in values]

    def tally(name: str) -> dict:
        return {"defense": name, "jobs": 0, "measured": 0, "measured_s": 0.0, "projected": 0, "projected_s": 0.0,
                "unmeasured": 0, "estimate_from": None}

    per_label: dict[str, dict] = {}
    for job in jobs:
        entry = per_label.setdefault(job.defense_label, tally(job.defense_label))
        entry["jobs"] += 1
        if job.key in parts:
            entry["measured"] += 1
            entry["measured_s"] += parts[job.key][1] + overhead
        elif defense_s.get(job.defense_label):
            entry["projected"] += 1
            entry["projected_s"] += statistics.median(defense_s[job.defense_label]) + overhead
            entry["estimate_from"] = f"median of {len(defense_s[job.defense_label])} measured jobs"
        elif (estimate := fallback_estimate(job, fallback.get(job.defense, []))) is not None:
            entry["projected"] += 1
            entry["projected_s"] += estimate[0] + overhead
            entry["estimate_from"] = estimate[1]
        else:
            entry["unmeasured"] += 1

    setup = tally("victims and trigger fits")
    for group in sorted({(job.attack_label, job.seed, job.dataset) for job in jobs}):
        attack = group[0]
        setup["jobs"] += 1
        fit = max(0.0, max(rest[attack]) - overhead) if rest.get(attack) else 0.0
        if victims.get(attack):
            setup["measured"] += 1
            setup["measured_s"] += statistics.median(victims[attack]) + fit
        elif all_victims:
            setup["projected"] += 1
            setup["projected_s"] += statistics.median(all_victims) + fit
            setup["estimate_from"] = f"median of {len(all_victims)} measured victims"
        else:
            setup["unmeasured"] += 1

    rows = [setup] + list(per_label.values())
    for row in rows:
        row["total_s"] = round(row["measured_s"] + row["projected_s"], 1)
        row["measured_s"] = round(row["measured_s"], 1)
        row["projected_s"] = round(row["projected_s"], 1)
    total = sum(r["total_s"] for r in rows)
    return {"rows": rows, "total_s": round(total, 1), "overhead_per_job_s": round(overhead, 1),
            "jobs": len(jobs), "measured_jobs": sum(r["measured"] for r in per_label.values()),
            "unmeasured_jobs": sum(r["unmeasured"] for r in rows),
            "lower_bound": any(r["unmeasured"] for r in rows),
            "hosts": sorted({r.get("host") or "unrecorded" for r in cpu_rows})}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="quick", help="grid name or file (default: quick)")
    ap.add_argument("--db", default=None, help="results database; default: leaderboard/results.sqlite")
    ap.add_argument("--json", default=None, help="default: bench/results/grid_wall_time_<grid>.json")
    args = ap.parse_args()

    plan = load_plan(args.grid)
    preset = plan.spec.preset
    db = ResultsDB(args.db)
    measured = {r["job_key"]: r for r in db.rows(status="done") if r["preset"] == preset}
    report = project(plan.runnable, list(measured.values()), cost_file_estimates(preset))
    report.update({"grid": plan.spec.name, "preset": preset, "db": str(db.path), "command": " ".join(sys.argv),
                   "target_s": TARGET_S.get(preset)})

    print(f"grid {plan.spec.name} (preset {preset}): {report['jobs']} jobs, {report['measured_jobs']} measured on a CPU")
    print(f"{'part':<34} {'jobs':>5} {'measured':>9} {'projected':>10} {'unmeasured':>11} {'hours':>7}  estimate from")
    for row in report["rows"]:
        print(f"{row['defense']:<34} {row['jobs']:>5} {row['measured']:>9} {row['projected']:>10} "
              f"{row['unmeasured']:>11} {_hours(row['total_s']):>7}  {row['estimate_from'] or '-'}")
    bound = " (lower bound: some jobs unmeasured)" if report["lower_bound"] else ""
    target = report["target_s"]
    versus = f"; target {_hours(target)} h ({report['total_s'] / target:.1f}x the target)" if target else ""
    print(f"whole grid: {_hours(report['total_s'])} h{bound}{versus}")
    print(f"per-job overhead (data load + evaluation): {report['overhead_per_job_s']} s; "
          f"measured on: {', '.join(report['hosts'])}")
    out = Path(args.json) if args.json else RESULTS / f"grid_wall_time_{plan.spec.name}.json"
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
