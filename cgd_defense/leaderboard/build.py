"""`cgd-bench leaderboard build`: the results database -> results.csv, README.md (tables),
index.html (one self-contained page), PNG plots, and the runs' entropy maps.

Everything is derived from the database alone (plus the PNG files the run folders hold), so the
leaderboard can be rebuilt at any time while a grid is still running.

The database itself is not committed; `results.csv` is. `read_results_csv` turns that export back
into database rows (`cgd-bench leaderboard import`), so a fresh checkout resumes a grid without
rerunning its finished jobs and rebuilds the same leaderboard. The CSV holds every column the tables
read, not the full result.json of each run.
"""
from __future__ import annotations

import calendar
import csv
import io
import json
import re
import shutil
import time
from pathlib import Path

from ..errors import CGDError
from ..harness.cache import atomic_write_text
from . import tables
from .db import ResultsDB
from .html import render_page

CSV_COLUMNS = ["grid", "job_key", "status", "dataset", "preset", "attack", "attack_name", "family", "defense",
               "defense_name", "threat_model", "clip", "seed", "clean_acc", "asr", "ra", "der", "nd_clean_acc",
               "nd_asr", "nd_ra", "ca_drop", "split_tpr", "split_fpr", "split_auroc", "split_auroc_score",
               "split_clean_part_poison_rate", "split_suspect_fraction", "split_n_clean", "split_n_suspect",
               "split_n_rest", "total_s", "defense_s", "backdoor_training_s", "cpu_s", "peak_rss_mb", "peak_gpu_mb",
               "n_train", "git_commit", "host", "finished_at", "error", "defense_params", "clip_info"]


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).strip("-")


def _copy_maps(rows: list[dict], flat: list[dict], out: Path) -> None:
    """Copy each run's PNG figures (e.g. CGD's entropy map) to out/maps/ and link them from the row.
    A row whose run folder is not on this machine (imported from results.csv) keeps the figures an
    earlier build copied there."""
    for row, f in zip(rows, flat):
        f["maps"] = []
        run_dir = Path(row["run_dir"]) if row.get("run_dir") else None
        if row["status"] != "done":
            continue
        if run_dir is None or not run_dir.is_dir():
            f["maps"] = [f"maps/{p.name}" for p in sorted((out / "maps").glob(f"{row['job_key'][:12]}-*.png"))]
            continue
        for png in sorted(run_dir.glob("*.png")):
            target = out / "maps" / f"{row['job_key'][:12]}-{png.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            f["maps"].append(f"maps/{target.name}")


def write_csv(rows: list[dict], flat: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row, f in zip(rows, flat):
        record = dict(f)
        record["defense_params"] = json.dumps((row.get("config") or {}).get("defense_params"), sort_keys=True)
        record["clip_info"] = json.dumps(row.get("clip_info"), sort_keys=True) if row.get("clip_info") else ""
        record["finished_at"] = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(f["finished_at"]))
                                 if f.get("finished_at") else "")
        writer.writerow(record)
    atomic_write_text(path, buf.getvalue())


def _number(text: str, integer: bool = False) -> float | int | None:
    if text == "":
        return None
    return int(float(text)) if integer else float(text)


def read_results_csv(path: str | Path) -> list[dict]:
    """The jobs of a `results.csv` as database rows (the inverse of `tables.flat_row` for every column
    the CSV holds), in file order, each with its `grid`. A job that had not finished (pending, running,
    failed or skipped) comes back as `pending`, with its metrics empty: work still to do."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = sorted(set(CSV_COLUMNS) - set(reader.fieldnames or []))
        if missing:
            raise CGDError(f"{path}: not a cgd-bench results.csv (missing columns: {', '.join(missing)})")
        records = list(reader)
    rows = []
    for r in records:
        n_suspect, fraction = _number(r["split_n_suspect"], integer=True), _number(r["split_suspect_fraction"])
        n_train = _number(r["n_train"], integer=True)
        split = None
        if any(r[c] != "" for c in CSV_COLUMNS if c.startswith("split_")):
            split = {"suspect_tpr": _number(r["split_tpr"]), "suspect_fpr": _number(r["split_fpr"]),
                     "clean_part_poison_rate": _number(r["split_clean_part_poison_rate"]),
                     "n_clean_part": _number(r["split_n_clean"], integer=True), "n_suspect_part": n_suspect,
                     "n_rest": _number(r["split_n_rest"], integer=True),
                     "n_total": (round(n_suspect / fraction) if n_suspect and fraction
                                 else n_train if fraction is not None else None)}
            if r["split_auroc_score"]:
                split[r["split_auroc_score"]] = _number(r["split_auroc"])
        times = {"defense": _number(r["defense_s"]), "backdoor_training": _number(r["backdoor_training_s"]),
                 "total": _number(r["total_s"])}
        rows.append({
            "grid": r["grid"], "job_key": r["job_key"], "status": "done" if r["status"] == "done" else "pending",
            "dataset": r["dataset"], "preset": r["preset"], "attack": r["attack_name"], "attack_label": r["attack"],
            "attack_family": r["family"] or None, "defense": r["defense_name"], "defense_label": r["defense"],
            "threat_model": r["threat_model"] or None, "clip": r["clip"] or None, "seed": int(r["seed"]),
            **{k: _number(r[k]) for k in ("clean_acc", "asr", "ra", "der", "nd_clean_acc", "nd_asr", "nd_ra",
                                          "total_s", "peak_rss_mb", "peak_gpu_mb", "cpu_s")},
            "split": split, "stage_times": {k: v for k, v in times.items() if v is not None},
            "data": {"n_train": n_train} if n_train is not None else None,
            "config": {"defense_params": json.loads(r["defense_params"]) if r["defense_params"] else None,
                       "imported_from": Path(path).name},
            "clip_info": json.loads(r["clip_info"]) if r["clip_info"] else None,
            "git_commit": r["git_commit"] or None, "host": r["host"] or None, "error": r["error"] or None,
            "finished_at": (calendar.timegm(time.strptime(r["finished_at"], "%Y-%m-%dT%H:%M:%SZ"))
                            if r["finished_at"] else None),
        })
    return rows


def readme(flat: list[dict], plots: dict[tuple, list[str]], db_path: Path) -> str:
    counts = {s: sum(1 for f in flat if f["status"] == s) for s in ("done", "failed", "skipped", "running", "pending")}
    lines = ["# cgd-bench leaderboard", "",
             f"Built by `cgd-bench leaderboard build` from `{db_path.name}` ({len(flat)} jobs: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "). Metrics are defined in "
             "[METRICS.md](METRICS.md); `results.csv` has one row per job, and `index.html` is the same data as "
             "one sortable, filterable page with plots.", "",
             "Numbers are percentages (DER on its 0-1 scale), mean ± standard deviation over seeds where a cell "
             "has several. A *stand-in CLIP* is a CLIP trained in this project on a public split of the dataset "
             "that the victim never sees (no pretrained CLIP weights can be downloaded here); results with it are "
             "not results with pretrained CLIP.", ""]
    board_rows = tables.boards(flat)
    if not board_rows:
        return "\n".join(lines + ["No finished job yet.", ""])
    lines += ["## Boards", ""] + [f"- [{g}: {d}, preset {p}](#{_slug(g, d, p).lower()})"
                                  for (g, d, p) in board_rows] + [""]
    for (grid, dataset, preset), rows in board_rows.items():
        lines += [f'<a id="{_slug(grid, dataset, preset).lower()}"></a>', "",
                  f"## Grid `{grid}`: {dataset}, preset `{preset}`", ""]
        rank_lines, _ = tables.ranking(rows)
        lines += ["### Overall ranking", "", tables.caption(rows), "",
                  "Mean over the attacks (the no-attack case excluded) of each attack's mean over seeds; ranked by "
                  "DER. The last columns are the defense's cost when nothing is wrong: CA lost and share of the "
                  "training set flagged as suspect on clean data.", ""] + rank_lines + [""]
        if tables.many_clips(rows):
            lines += ["### CLIP variants (ablation)", "", tables.caption(rows), "",
                      "Each cell: CA % / ASR %; `none` rows are the defenses that read no CLIP.", ""]
            lines += tables.clip_variant_table(rows) + [""]
        lines += ["### Per attack", ""] + tables.attack_tables(rows)
        if any(r["split_n_suspect"] is not None for r in rows):
            lines += ["### Split quality", "", tables.caption(rows), "",
                      "Against the ground-truth poison mask, which no defense reads: TPR/FPR of the suspect part, "
                      "share of poisoned samples in the part kept as clean, AUROC of the defense's suspicion score.",
                      ""] + tables.split_table(rows) + [""]
        lines += ["### Cost", "", tables.caption(rows), "",
                  "Wall time per job on the machine that ran it (a job that found the backdoored model in the cache "
                  "does not include its training) and the worker's peak memory.", ""] + tables.cost_table(rows) + [""]
        for plot in plots.get((grid, dataset, preset), []):
            lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def build_leaderboard(db: ResultsDB, out_dir: str | Path, grids: list[str] | None = None) -> list[Path]:
    """Write the leaderboard of `grids` (default: all in the database) under `out_dir`; return the files."""
    out = Path(out_dir)
    rows = db.rows(grids)
    if not db.grids():
        # Checked before anything is written: an empty database (e.g. the default path of another
        # checkout) would otherwise replace a published leaderboard with empty tables.
        raise CGDError(f"{db.path} holds no jobs, so there is nothing to build and {out} is left as it is; on a "
                       "fresh checkout run `cgd-bench leaderboard import leaderboard/results.csv` first, or pass --db")
    if grids:
        missing = sorted(set(grids) - {r["grid"] for r in rows})
        if missing:
            raise CGDError(f"grid(s) {', '.join(missing)} have no job in {db.path}; known: {', '.join(db.grids())}")
    out.mkdir(parents=True, exist_ok=True)
    flat = tables.with_series([tables.flat_row(r) for r in rows])
    _copy_maps(rows, flat, out)
    written = [out / "results.csv", out / "README.md", out / "index.html"]
    write_csv(rows, flat, written[0])

    from .plots import board_plots

    plots: dict[tuple, list[str]] = {}
    for key, board in tables.boards(flat).items():
        paths = board_plots(board, out / "plots", _slug(*key))
        plots[key] = [str(p.relative_to(out)) for p in paths]
        written += paths
    atomic_write_text(written[1], readme(flat, plots, db.path))
    atomic_write_text(written[2], render_page(flat, title="cgd-bench leaderboard"))
    return written
