"""`leaderboard build` on a database filled with hand-made results (no training): results.csv,
README tables (captions, mean ± std, ranking, split quality), plots, entropy-map links, and the page
in headless Chromium."""
import csv
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cgd_defense.config import PROJECT_ROOT
from cgd_defense.leaderboard.build import build_leaderboard, read_results_csv
from cgd_defense.leaderboard.db import ResultsDB
from cgd_defense.leaderboard.grid import load_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (attack, defense label) -> per seed (CA, ASR); the no-defense model: CA 0.90, ASR 0.98 (0.0 on clean)
VALUES = {
    ("clean", "none"): [(0.91, None), (0.93, None)],
    ("clean", "fp[clean_source=oracle]"): [(0.89, None), (0.90, None)],
    ("badnets", "none"): [(0.90, 0.98), (0.90, 0.98)],
    ("badnets", "fp[clean_source=oracle]"): [(0.88, 0.02), (0.86, 0.04)],
}


def fake_result(job, seed_index, run_dir=None):
    ca, asr = VALUES[(job.attack, job.defense_label)][seed_index]
    nd_ca, nd_asr = (0.91 + 0.02 * seed_index, None) if job.attack == "clean" else (0.90, 0.98)
    split = None
    if job.defense == "fp":
        split = {"n_total": 100, "n_poison": 10, "n_clean_part": 60, "n_suspect_part": 12, "n_rest": 28,
                 "suspect_tpr": 0.9, "suspect_fpr": 0.033, "clean_part_poison_rate": 0.0, "auroc_loss": 0.97}
    der = None if asr is None else (max(0, nd_asr - asr) - max(0, nd_ca - ca) + 1) / 2
    return {"clean_acc": ca, "asr": asr, "ra": None if asr is None else 0.8, "der": der,
            "no_defense": {"clean_acc": nd_ca, "asr": nd_asr, "ra": None if nd_asr is None else 0.01},
            "split": split, "stage_times": {"defense": 1.5, "total": 12.0}, "data": {"n_train": 3600},
            "clip": job.resolved["clip"], "git_commit": "0123456789abcdef0123-dirty", "versions": {"torch": "x"},
            "clip_info": {"spec": "standin:cifar10", "label": "stand-in CLIP", "identity": "ab" * 32,
                          "prompts": ["a photo of a {}"], "calibration": "cosine"} if job.defense == "fp" else None}


@pytest.fixture(scope="module")
def filled_db(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("board")
    grid = tmp / "board.yaml"
    grid.write_text(textwrap.dedent("""
        preset: smoke
        datasets: [cifar10]
        seeds: [0, 1]
        attacks: [clean, badnets]
        defenses: [none, {name: fp, options: {clean_source: [oracle]}}]
    """))
    plan = load_plan(grid)
    db = ResultsDB(tmp / "results.sqlite")
    db.register(plan.spec.name, plan.jobs)
    for job in plan.jobs:
        run_dir = tmp / "runs" / job.key[:8]
        run_dir.mkdir(parents=True)
        if job.defense == "fp" and job.attack == "badnets":
            (run_dir / "entropy_map.png").write_bytes(PNG_MAGIC + b"fake")
        db.mark_running(job.key)
        db.record_result(job.key, fake_result(job, job.seed), peak_rss_mb=900.0, peak_gpu_mb=None, host="h",
                         run_dir=str(run_dir), cpu_s=30.0)
    pending = load_plan(grid).jobs[0]
    return db, plan, tmp, pending


@pytest.fixture(scope="module")
def board(filled_db):
    db, plan, tmp, _ = filled_db
    out = tmp / "out"
    written = build_leaderboard(db, out)
    return out, written, plan


def test_csv_has_one_row_per_job_with_metrics_and_clip_settings(board):
    out, _, plan = board
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(plan.jobs) == 8
    fp = [r for r in rows if r["defense"] == "fp[clean_source=oracle]" and r["attack"] == "badnets"]
    assert sorted(float(r["asr"]) for r in fp) == [0.02, 0.04]
    assert all('"identity": "abab' in r["clip_info"] and "stand-in CLIP" in r["clip_info"] for r in fp)
    assert all(r["clip_info"] == "" for r in rows if r["defense"] == "none")
    assert all(r["clip"] == "standin:cifar10" for r in fp)
    assert {r["status"] for r in rows} == {"done"} and all(r["git_commit"].endswith("-dirty") for r in rows)


def test_readme_tables_state_preset_dataset_clip_and_commit(board):
    out, _, _ = board
    text = (out / "README.md").read_text()
    captions = [line for line in text.splitlines() if line.startswith("*Dataset")]
    assert len(captions) >= 5  # ranking, two attacks, split quality, cost
    for line in captions:
        assert "preset `smoke`" in line and "cifar10" in line and "commit 0123456789 (uncommitted changes)" in line
    assert any("stand-in CLIP `standin:cifar10`" in line for line in captions)
    assert not re.search(r"pretrained CLIP `standin", text)
    badnets = text.split("#### badnets")[1].split("####")[0]
    # mean ± sample std over the two seeds
    # DER per seed: (0.96 - 0.02 + 1) / 2 = 0.97 and (0.94 - 0.04 + 1) / 2 = 0.95
    assert "| fp[clean_source=oracle] | 87.00 ± 1.41 | 3.00 ± 1.41 | 80.00 ± 0.00 | 0.960 ± 0.014 | 12.00 ± 0.00 | 2 |" \
        in badnets
    assert "| none | 90.00 ± 0.00 | 98.00 ± 0.00 |" in badnets


def test_ranking_split_and_cost_tables(board):
    out, _, _ = board
    text = (out / "README.md").read_text()
    ranking = text.split("### Overall ranking")[1].split("###")[0]
    lines = [line for line in ranking.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert lines[0].startswith("| 1 | fp[clean_source=oracle] | 0.960") and lines[1].startswith("| 2 | none | 0.500")
    # cost on clean data: CA drop vs the undefended model of the no-attack case, seeds 0.91->0.89, 0.93->0.90
    assert "| 2.50 ± 0.71 | 12.00 ± 0.00 | 1/1 |" in lines[0]
    split = text.split("### Split quality")[1].split("###")[0]
    assert "| badnets | fp[clean_source=oracle] | 90.00 ± 0.00 | 3.30 ± 0.00 | 0.00 ± 0.00 | 0.970 ± 0.000 (loss) |" in split
    assert "| fp[clean_source=oracle] | 4 | 1.5 ± 0.0 | 12.0 ± 0.0 | 30.0 ± 0.0 | 900 | – |" in text


def test_plots_and_entropy_maps(board):
    out, written, _ = board
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["board-cifar10-smoke-asr_vs_ca.png", "board-cifar10-smoke-per_attack.png"]
    assert all((out / "plots" / p).read_bytes().startswith(PNG_MAGIC) for p in plots)
    assert all(f"plots/{p}" in (out / "README.md").read_text() for p in plots)
    maps = list((out / "maps").iterdir())
    assert len(maps) == 2 and all(m.name.endswith("-entropy_map.png") for m in maps)
    html = (out / "index.html").read_text()
    assert all(f"maps/{m.name}" in html for m in maps)
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")


def test_results_csv_imports_back_into_a_fresh_database_unchanged(board, filled_db, tmp_path):
    """A fresh checkout has results.csv but no database: importing it gives the same leaderboard and
    the finished jobs count as done for a rerun of the grid."""
    out, _, plan = board
    db, *_ = filled_db
    rebuilt = tmp_path / "out"
    shutil.copytree(out, rebuilt)  # the committed leaderboard folder, entropy maps included
    proc = subprocess.run([sys.executable, "-m", "cgd_defense.cli", "leaderboard", "import", str(out / "results.csv"),
                           "--db", str(tmp_path / "fresh.sqlite")], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert proc.returncode == 0 and "imported 8 finished jobs" in proc.stdout, proc.stderr
    fresh = ResultsDB(tmp_path / "fresh.sqlite")
    assert set(fresh.statuses(j.key for j in plan.jobs).values()) == {"done"}
    build_leaderboard(fresh, rebuilt)
    assert (rebuilt / "results.csv").read_text() == (out / "results.csv").read_text()
    assert (rebuilt / "README.md").read_text().replace("fresh.sqlite", "results.sqlite") == \
        (out / "README.md").read_text()
    assert "-entropy_map.png" in (rebuilt / "index.html").read_text()
    # importing into the database that ran the jobs keeps its fuller rows
    assert db.import_rows(read_results_csv(out / "results.csv")) == (0, 8, 0)
    assert db.rows(status="done")[0]["result"] is not None


def test_unfinished_jobs_survive_export_and_import(tmp_path):
    """A grid half run: its export lists the unfinished jobs, and importing that export into a fresh
    database (a fresh checkout) registers them as pending, so the rebuilt board lists the same work."""
    grid = tmp_path / "half.yaml"
    grid.write_text("preset: smoke\ndatasets: [cifar10]\nseeds: [0]\nattacks: [clean, badnets]\ndefenses: [none]\n")
    plan = load_plan(grid)
    db = ResultsDB(tmp_path / "ran.sqlite")
    db.register(plan.spec.name, plan.jobs)
    finished, unfinished = plan.jobs
    db.mark_running(finished.key)
    db.record_result(finished.key, fake_result(finished, 0), peak_rss_mb=1.0, peak_gpu_mb=None, host="h", run_dir=None)
    build_leaderboard(db, tmp_path / "out")
    rows = read_results_csv(tmp_path / "out" / "results.csv")
    assert [(r["job_key"], r["status"]) for r in rows] == [(finished.key, "done"), (unfinished.key, "pending")]
    fresh = ResultsDB(tmp_path / "fresh.sqlite")
    assert fresh.import_rows(rows) == (1, 0, 1)
    assert fresh.statuses([finished.key, unfinished.key]) == {finished.key: "done", unfinished.key: "pending"}
    build_leaderboard(fresh, tmp_path / "rebuilt")
    assert (tmp_path / "rebuilt" / "results.csv").read_text() == (tmp_path / "out" / "results.csv").read_text()
    # a job the database already has is left as it is, whatever the export says
    assert db.import_rows(rows) == (0, 1, 0)
    assert db.statuses([finished.key])[finished.key] == "done"


def test_import_refuses_a_file_that_is_not_a_results_csv(tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    proc = subprocess.run([sys.executable, "-m", "cgd_defense.cli", "leaderboard", "import", str(bad),
                           "--db", str(tmp_path / "x.sqlite")], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert proc.returncode == 2 and "not a cgd-bench results.csv (missing columns:" in proc.stderr


def test_build_cli_and_grid_filter(filled_db, tmp_path):
    db, *_ = filled_db
    proc = subprocess.run([sys.executable, "-m", "cgd_defense.cli", "leaderboard", "build", "--db", str(db.path),
                           "--out", str(tmp_path / "o"), "--grid", "nope"], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)
    assert proc.returncode == 2 and "grid(s) nope have no job" in proc.stderr and "known: board" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cgd_defense.cli", "leaderboard", "build", "--db", str(db.path),
                           "--out", str(tmp_path / "o"), "--grid", "board"], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "index.html").is_file() and "wrote" in proc.stdout


def test_build_refuses_an_empty_database_and_writes_nothing(tmp_path):
    empty, out = tmp_path / "empty.sqlite", tmp_path / "board"
    proc = subprocess.run([sys.executable, "-m", "cgd_defense.cli", "leaderboard", "build", "--db", str(empty),
                           "--out", str(out)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert proc.returncode == 2 and f"{empty} holds no jobs" in proc.stderr and "leaderboard import" in proc.stderr
    assert not out.exists()


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium); .ci/run installs it")


def test_page_loads_in_headless_chromium_without_console_errors(board, tmp_path):
    out, _, plan = board
    browser = chromium()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "index.html").as_uri()
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # the page logs nothing: any console message is an error or a leftover
    assert 'data-ready="true"' in dom.stdout, "the page script did not finish"
    assert re.search(r'id="errors" data-count="0"', dom.stdout)
    body = dom.stdout.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr") == len(plan.jobs) == 8  # the table holds the database's rows
    assert body.count('href="maps/') == 2
    assert dom.stdout.count('class="point"') == 2  # one dot per (defense, attack) on the ASR-vs-CA scatter
    shot = tmp_path / "page.png"
    proc = subprocess.run(flags + ["--window-size=1400,1600", f"--screenshot={shot}", url], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0 and shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 10_000
    Path(out / "screenshot.png").write_bytes(shot.read_bytes())


def test_boards_that_vary_the_clip_never_average_across_clips():
    from cgd_defense.leaderboard import tables

    def row(defense, clip, asr):
        return {"grid": "ablation", "dataset": "cifar10", "preset": "quick", "status": "done", "attack": "badnets",
                "family": "dirty-label", "defense": defense, "clip": clip, "seed": 0, "clean_acc": 0.9, "asr": asr,
                "ra": 0.1, "der": 1 - asr, "ca_drop": 0.0, "split_suspect_fraction": None, "n_train": 100,
                "git_commit": "abc", "preset_name": "quick"}

    rows = tables.with_series([row("none", None, 0.99), row("cgd", "standin:cifar10", 0.01),
                               row("cgd", "standin:cifar10:weak-10", 0.51)])
    assert [r["series"] for r in rows] == ["none", "cgd (standin:cifar10)", "cgd (standin:cifar10:weak-10)"]
    _, entries = tables.ranking(rows)
    assert [(e["defense"], e["asr"].mean) for e in entries] == [
        ("cgd (standin:cifar10)", 0.01), ("cgd (standin:cifar10:weak-10)", 0.51), ("none", 0.99)]
    variants = "\n".join(tables.clip_variant_table(rows))
    assert "| cgd | `standin:cifar10:weak-10` (stand-in) | 90.0 / 51.0 |" in variants
    assert "| none | none | 90.0 / 99.0 |" in variants
