"""The `paper` preset (PreActResNet-18, BackdoorBench's 100-epoch CIFAR-10 recipe) end to end, timed:
for each ATTACK:DEFENSE pair, one `cgd-bench run` (poison, train the victim, defend, evaluate) with
its clean accuracy, ASR, RA and per-stage wall times. Meant for a GPU; runs anywhere.

    python bench/paper_preset.py --data-root ~/data/cifar10 \\
        --runs badnets:none badnets:cgd-reference badnets:cgd blended:none blended:cgd

`cgd-reference` is `cgd` with `variant=reference` (the authors' code). Runs go one after another
and share the cache, so a defense reuses its attack's victim. The table is printed and the JSON
(bench/results/paper_preset.json unless --json) is rewritten after every run, so a run cut short
keeps what finished. The CLIP is the stand-in CLIP unless --clip names another; the JSON says which.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from cgd_defense.harness.cache import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
DEFENSE_ALIASES = {"cgd-reference": ("cgd", ["variant=reference"])}


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    attack, sep, defense = spec.partition(":")
    if not sep or not attack or not defense:
        raise SystemExit(f"--runs: expected ATTACK:DEFENSE, got {spec!r}")
    name, opts = DEFENSE_ALIASES.get(defense, (defense, []))
    return attack, name, opts


def run_one(spec: str, args: argparse.Namespace, run_dir: Path) -> dict:
    attack, defense, opts = parse_run(spec)
    cmd = [sys.executable, "-m", "cgd_defense.cli", "run", "--attack", attack, "--defense", defense,
           "--dataset", args.dataset, "--preset", args.preset, "--seed", str(args.seed), "--out", str(run_dir)]
    for opt in opts:
        cmd += ["--defense-opt", opt]
    for flag, value in (("--data-root", args.data_root), ("--cache-dir", args.cache_dir), ("--clip", args.clip),
                        ("--device", args.device)):
        if value:
            cmd += [flag, value]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "CGD_PROGRESS": "0"}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"run": spec, "error": (proc.stderr or proc.stdout)[-2000:], "wall_s": round(wall, 1)}
    result = json.loads((run_dir / "result.json").read_text())
    clip_info = result.get("clip_info") or {}
    return {"run": spec, "attack": attack, "defense": defense, "defense_opts": opts,
            "clean_acc": result["clean_acc"], "asr": result["asr"], "ra": result["ra"],
            "no_defense": result.get("no_defense"), "stage_times": result["stage_times"],
            "split": result.get("split"),
            "clip": clip_info.get("label"), "machine": result.get("machine"), "wall_s": round(wall, 1)}


def print_table(rows: list[dict]) -> None:
    print(f"{'run':28} {'CA':>6} {'ASR':>6} {'RA':>6} {'victim s':>9} {'defense s':>10} {'total s':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['run']:28} FAILED: {row['error'].strip().splitlines()[-1][:80]}")
            continue
        st = row["stage_times"]
        print(f"{row['run']:28} {100 * row['clean_acc']:6.2f} {100 * row['asr']:6.2f} {100 * row['ra']:6.2f} "
              f"{st.get('backdoor_training', 0):9.1f} {st.get('defense', 0):10.1f} {st.get('total', 0):8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["badnets:none", "badnets:cgd-reference", "badnets:cgd"])
    ap.add_argument("--data-root", default=os.environ.get("CGD_DATA_ROOT"))
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip", default=None, help="default: the registry's (the dataset's stand-in CLIP)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--run-dir", default="runs/paper_preset", help="where each run's result.json goes")
    ap.add_argument("--json", default=str(RESULTS / "paper_preset.json"))
    args = ap.parse_args()
    for spec in args.runs:
        parse_run(spec)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"preset": args.preset, "dataset": args.dataset, "seed": args.seed, "device": device,
              "torch": torch.__version__, "command": " ".join(sys.argv), "runs": []}
    out = Path(args.json)
    for spec in args.runs:
        row = run_one(spec, args, Path(args.run_dir) / spec.replace(":", "__"))
        report["runs"].append(row)
        atomic_write_text(out, json.dumps(report, indent=2))
        print(f"[{time.strftime('%H:%M:%S')}] {spec} done in {row['wall_s']} s", flush=True)
    print(f"device: {device}, preset {args.preset}, seed {args.seed}")
    print_table(report["runs"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
