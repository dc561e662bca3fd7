"""What each poisoned-data defense costs: CGD, ABL, DBD and ASD on the same cached poisoned set and
backdoored model, wall time and peak memory side by side (the CGD paper claims CGD is far cheaper;
the project's target on this CPU is CGD <= 0.2x ASD's and <= 0.1x DBD's wall time).

    python bench/defense_cost.py --data-root ~/data/cifar10                      # quick preset, badnets + sig
    python bench/defense_cost.py --data-root ../shared/data/cifar10-mini --preset smoke --defenses abl asd

Each defense runs in a subprocess of its own, so its peak resident memory is its own: the worker
loads the data and the backdoored model, resets the kernel's peak-RSS mark, runs `fit`, and reads
the mark again. What it reports:
- `wall_s`: `fit` alone, with the per-stage times the defense records (`stage_times`);
- `peak_rss_mb`: the process's peak during `fit` (data and model included); `extra_rss_mb`: that
  peak minus the resident size just before `fit`, i.e. what the defense itself added.
The poisoned sets, backdoored models and the stand-in CLIP (the price of having no pretrained CLIP
here, not part of CGD) come from `--cache-dir`, prepared first by the parent; every intermediate a
defense computes (CLIP image features, suspicious model, SimCLR backbone, ...) is recomputed, never
read from a cache. Prints a table, writes bench/results/defense_cost_<preset>.json.

The shortened presets shrink each defense's schedule by a different factor (CGD's suspicious model
keeps 2 of its 5 epochs at `quick`, DBD's MixMatch 8 of its 190), so the report also projects every
row to the `paper` preset's schedules (`--project-to`): each timed stage scaled by the ratio of the
work the defense declares for it there and here (`Defense.stage_work`), same model, data and machine.
That is arithmetic on the measurement, labelled as a projection, never a measurement.

The whole comparison (badnets + sig, four defenses) takes about 3.5 hours on a 2-core AMX CPU and
about 6.5 on the 2-core AMD EPYC host (DBD about 1.9 h and ASD 1.2 h per attack there). The report
is rewritten after every defense, and `--resume` keeps the rows of an earlier, cut-short run of the
same comparison (same preset, dataset, seed, and the same machine: CPU model, core count, GPU) and runs
only the missing ones, so the comparison can be finished in later sittings on the same host, each
running part of it (`--defenses dbd --resume` keeps the other defenses' rows). Rows
measured on another machine are refused, never mixed into the ratios; every row records its commit
and finish time, and `runs` lists each sitting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cgd_defense.harness.script_args import add_run_arguments, run_config

RESULTS = Path(__file__).resolve().parent / "results"
# Cache kinds a worker may read: the benchmark's fixed inputs. Everything else is computed afresh.
SHARED_KINDS = {"decoded", "poisoned", "backdoored", "clip_standin"}


def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: `5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    """Run one defense on one attack's cached poisoned set and backdoored model; return its costs."""
    import torch

    from cgd_defense.harness.cache import Cache
    from cgd_defense.harness.pipeline import backdoored_model, defense_context, evaluate, prepare_data
    from cgd_defense.harness.presets import get_preset
    from cgd_defense.registry import create_attack, create_defense

    class BenchCache(Cache):
        """The shared cache for the benchmark's inputs; a pass-through for everything else."""

        def get_or_compute(self, kind, spec, compute):
            if kind in SHARED_KINDS:
                return super().get_or_compute(kind, spec, compute)
            self.misses.append(kind)
            return compute()

    cfg = run_config(args, attack=args.attack, defense=args.defense)
    preset = get_preset(cfg.preset)
    cache = BenchCache(cfg.cache_dir)
    data = prepare_data(cfg, preset, create_attack(cfg.attack), cache)
    model, _ = backdoored_model(cfg, preset, data, cache)
    defense = create_defense(cfg.defense, preset=cfg.preset)
    with tempfile.TemporaryDirectory(prefix="defense-cost-") as artifacts:
        context = defense_context(cfg, data, preset, cache, Path(artifacts))
        train_view, val_view = data.train.defender_view(), data.val.defender_view()
        rss_before = _rss_mb("VmRSS")
        peak_reset = _reset_peak_rss()
        t0 = time.perf_counter()
        defense.fit(model, train_view, val_set=val_view, context=context)
        wall = time.perf_counter() - t0
        peak = _rss_mb("VmHWM") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = evaluate(defense.model_, data, preset, cfg.device)
    return {"attack": cfg.attack, "defense": cfg.defense, "preset": cfg.preset, "wall_s": round(wall, 2),
            "stage_times": dict(context.stage_times), "peak_rss_mb": round(peak, 1),
            "extra_rss_mb": round(peak - rss_before, 1) if rss_before is not None else None,
            "peak_scope": "fit" if peak_reset else "process lifetime (clear_refs unavailable)",
            "n_train": len(train_view), "threads": torch.get_num_threads(),
            "clean_acc": metrics["clean_acc"], "asr": metrics["asr"], "params": defense.get_params()}


def prepare_inputs(args) -> dict:
    """Poison, train the victim and (for CGD) the stand-in CLIP once, into the shared cache."""
    from cgd_defense.harness.cache import Cache
    from cgd_defense.harness.pipeline import backdoored_model, prepare_data
    from cgd_defense.harness.presets import get_preset
    from cgd_defense.registry import create_attack

    times = {}
    cache = Cache(args.cache_dir)
    preset = get_preset(args.preset)
    for attack in args.attacks:
        cfg = run_config(args, attack=attack)
        t0 = time.perf_counter()
        backdoored_model(cfg, preset, prepare_data(cfg, preset, create_attack(attack), cache), cache)
        times[f"inputs.{attack}"] = round(time.perf_counter() - t0, 1)
    if "cgd" in args.defenses:
        cfg = run_config(args)
        if cfg.resolved_clip().startswith("standin:"):
            from cgd_defense.clip import load_clip  # only CGD needs a CLIP

            t0 = time.perf_counter()
            load_clip(cfg.resolved_clip(), dataset=args.dataset, data_root=args.data_root, cache=cache,
                      device=args.device)
            times["inputs.clip_standin"] = round(time.perf_counter() - t0, 1)
    return times


def run_worker(args, attack: str, defense: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--attack", attack, "--defense", defense, "--preset", args.preset,
           "--dataset", args.dataset, "--seed", str(args.seed), "--cache-dir", args.cache_dir]
    for flag, value in (("--data-root", args.data_root), ("--device", args.device)):
        if value:
            cmd += [flag, value]
    env = {**os.environ, "CGD_PROGRESS": os.environ.get("CGD_PROGRESS", "0")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"attack": attack, "defense": defense, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def print_table(rows: list[dict]) -> None:
    head = f"{'attack':<10} {'defense':<8} {'wall s':>8} {'peak MiB':>9} {'+MiB':>7} {'CA':>6} {'ASR':>6}  stages (s)"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['attack']:<10} {r['defense']:<8} FAILED: {r['error']}")
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_times"].items())
        asr = f"{r['asr']:.3f}" if r["asr"] is not None else "-"
        print(f"{r['attack']:<10} {r['defense']:<8} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>9.0f} "
              f"{r['extra_rss_mb'] if r['extra_rss_mb'] is not None else float('nan'):>7.0f} {r['clean_acc']:>6.3f} "
              f"{asr:>6}  {stages}")


def ratios(rows: list[dict]) -> dict:
    """CGD's wall time over each other defense's, per attack (the target: <= 0.2 vs ASD, <= 0.1 vs DBD)."""
    out = {}
    walls = {(r["attack"], r["defense"]): r["wall_s"] for r in rows if "error" not in r}
    for attack in sorted({a for a, _ in walls}):
        cgd = walls.get((attack, "cgd"))
        if cgd is None:
            continue
        out[attack] = {f"cgd/{d}": round(cgd / w, 3) for (a, d), w in walls.items()
                       if a == attack and d != "cgd" and w > 0}
    return out


def projected(rows: list[dict], preset: str) -> dict:
    """Each measured row scaled to `preset`'s schedule of its defense, stage by stage, by the ratio of
    the work the defense declares for that stage at the two settings (`Defense.stage_work`): what the
    comparison would show at that schedule with the same model, data and machine. A projection, not a
    measurement; time outside the timed stages is kept as measured. Rows of a defense that declares
    no stage work, or with a stage it does not declare, are left out."""
    from cgd_defense.registry import create_defense

    out = []
    for r in rows:
        if "error" in r:
            continue
        measured = create_defense(r["defense"], **r["params"]).stage_work(r["n_train"])
        target = create_defense(r["defense"], preset=preset).stage_work(r["n_train"])
        if not set(r["stage_times"]) <= set(measured):
            continue
        factors = {stage: target[stage] / measured[stage] for stage in r["stage_times"]}
        outside_stages = r["wall_s"] - sum(r["stage_times"].values())
        wall = outside_stages + sum(t * factors[stage] for stage, t in r["stage_times"].items())
        out.append({"attack": r["attack"], "defense": r["defense"], "wall_s": round(wall, 1),
                    "stage_factors": {k: round(v, 3) for k, v in factors.items()}})
    return {"preset": preset, "rows": out, "cgd_ratios": ratios(out)}


def resumable_rows(out: Path, args, machine_info: dict) -> tuple[dict, list]:
    """The finished rows of an earlier report at `out` that this run may keep, keyed by (attack,
    defense), and the earlier sittings. Exits with a message when the report is for other settings or
    another machine: wall times from two hosts are not comparable."""
    if not out.exists():
        return {}, []
    try:
        report = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--resume: cannot read {out}: {exc}") from None
    for field in ("preset", "dataset", "seed"):
        if report.get(field) != getattr(args, field):
            raise SystemExit(f"--resume: {out} has {field} {report.get(field)!r}, this run {getattr(args, field)!r}; "
                             "use another --out")
    kept = {}
    for row in report.get("rows", []):
        if "error" in row:
            continue  # a failed defense is run again
        measured_on = row.get("machine", report.get("machine"))
        if measured_on != machine_info:
            raise SystemExit(f"--resume: {out} holds {row['attack']}/{row['defense']} measured on {measured_on}, "
                             f"this machine is {machine_info}; wall times from two machines are not compared: "
                             "use another --out")
        kept[(row["attack"], row["defense"])] = {**row, "machine": measured_on}
    return kept, report.get("runs", [])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, preset="quick")
    parser.add_argument("--attacks", nargs="+", default=["badnets", "sig"])
    parser.add_argument("--defenses", nargs="+", default=["cgd", "abl", "dbd", "asd"])
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/defense_cost_<preset>.json)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of --out measured on this machine with these settings; run only the rest")
    parser.add_argument("--project-to", default="paper", metavar="PRESET",
                        help="also scale the measured times to this preset's schedules (default: paper)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    parser.add_argument("--defense", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cache_dir is None:
        from cgd_defense.config import default_cache_dir

        args.cache_dir = str(default_cache_dir())
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    from cgd_defense.errors import CGDError
    from cgd_defense.harness.cache import atomic_write_text
    from cgd_defense.harness.presets import get_preset
    from cgd_defense.harness.provenance import git_commit, machine, package_versions
    from cgd_defense.registry import is_defense

    missing = [d for d in args.defenses if not is_defense(d)]
    if missing:
        parser.error(f"unknown defense(s) {missing}")
    try:
        get_preset(args.project_to)  # an unknown preset fails here, naming the known ones, before any work
    except CGDError as exc:
        parser.error(str(exc))
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else RESULTS / f"defense_cost_{args.preset}.json"
    machine_info = machine()
    kept, runs = resumable_rows(out, args, machine_info) if args.resume else ({}, [])
    runs = [*runs, {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_commit": git_commit()}]
    pending = [(a, d) for a in args.attacks for d in args.defenses if (a, d) not in kept]
    input_times = prepare_inputs(argparse.Namespace(**{
        **vars(args), "attacks": list(dict.fromkeys(a for a, _ in pending)),
        "defenses": list(dict.fromkeys(d for _, d in pending))})) if pending else {}
    runs[-1]["input_times_s"] = input_times  # each sitting's own preparation (cached inputs: ~0)
    provenance = {"machine": machine_info, "platform": platform.platform(), "versions": package_versions(),
                  "git_commit": runs[-1]["git_commit"], "runs": runs}

    def write_report(rows: list[dict]) -> dict:
        # Rewritten after every defense, so a long run cut short keeps what finished.
        report = {"preset": args.preset, "dataset": args.dataset, "seed": args.seed, "rows": rows,
                  "cgd_ratios": ratios(rows), "projection": projected(rows, args.project_to),
                  "input_times_s": input_times,
                  "total_s": round(time.perf_counter() - t0, 1), **provenance}
        atomic_write_text(out, json.dumps(report, indent=2))
        return report

    # Every kept row stays, in its place, whether or not this sitting names its attack and defense: a
    # comparison may be finished by sittings that each run part of it (e.g. `--defenses dbd --resume`).
    rows = list(kept.values())
    for row in rows:
        print(f"  {row['attack']}/{row['defense']}: {row['wall_s']:.1f} s (kept from an earlier sitting)", flush=True)
    for attack, defense in pending:
        rows.append({**run_worker(args, attack, defense), "machine": machine_info,
                     "git_commit": runs[-1]["git_commit"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        r = rows[-1]
        print(f"  {attack}/{defense}: " + (f"{r['wall_s']:.1f} s" if "error" not in r else "FAILED"), flush=True)
        write_report(rows)
    report = write_report(rows)
    print()
    print_table(rows)
    for attack, r in report["cgd_ratios"].items():
        print(f"{attack}: " + ", ".join(f"{k} = {v:.3f}" for k, v in r.items()))
    projection = report["projection"]
    if projection["rows"]:
        print(f"\nprojected to the {args.project_to} preset's schedules (not measured: the same model, data and "
              "machine, each stage scaled by its work):")
        for r in projection["rows"]:
            factors = ", ".join(f"{k} x{v:g}" for k, v in r["stage_factors"].items())
            print(f"{r['attack']:<10} {r['defense']:<8} {r['wall_s']:>10.0f} s  ({factors})")
        for attack, r in projection["cgd_ratios"].items():
            print(f"{attack}: " + ", ".join(f"{k} = {v:.3f}" for k, v in r.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
