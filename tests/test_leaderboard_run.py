"""Running a grid end to end on cifar10-mini at the smoke preset: results database, progress bar,
resume after a real SIGKILL, failed jobs and --retry-failed, skipped unregistered names, several
local workers, and the Ray backend. The grid is the smoke grid cut down to the no-attack case and
BadNets without defense (2 jobs): its two backdoored models are trained once by the first test and
read from the session cache by every later run."""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import yaml

from cgd_defense.config import PROJECT_ROOT
from cgd_defense.leaderboard.db import ResultsDB
from cgd_defense.leaderboard.grid import GRIDS_DIR, load_plan
from cgd_defense.leaderboard.runner import run_grid


def cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "cgd_defense.cli", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env={**os.environ, "CGD_PROGRESS": "0", **(env or {})}, timeout=1800,
                          **kwargs)


def job_rows(db_path) -> dict[str, dict]:
    with sqlite3.connect(db_path) as conn:
        conn.row_factory = sqlite3.Row
        return {r["attack"]: dict(r) for r in conn.execute("SELECT * FROM jobs")}


def assert_stages_logged(run_log: Path, *messages: str) -> None:
    """`run_log` has a timestamped line for each message, in this order."""
    lines = run_log.read_text().splitlines()
    positions = [next((i for i, line in enumerate(lines) if message in line), None) for message in messages]
    assert None not in positions and positions == sorted(positions), (messages, lines)
    assert all(line[:4].isdigit() for line in lines)  # every line starts with its date


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory) -> Path:
    smoke = yaml.safe_load((GRIDS_DIR / "smoke.yaml").read_text())
    smoke.update(name="tiny", attacks=["clean", "badnets"], defenses=["none"])
    path = tmp_path_factory.mktemp("grid") / "tiny.yaml"
    path.write_text(yaml.safe_dump(smoke))
    return path


@pytest.fixture(scope="module")
def first_run(tiny_grid, mini_root, session_cache_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "results.sqlite"
    proc = cli("grid", "run", str(tiny_grid), "--db", str(db), "--data-root", str(mini_root),
               "--cache-dir", str(session_cache_dir), env={"CGD_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return db, proc


def test_grid_run_records_one_complete_row_per_job(first_run):
    db, proc = first_run
    rows = job_rows(db)
    assert set(rows) == {"clean", "badnets"} and {r["status"] for r in rows.values()} == {"done"}
    bad = rows["badnets"]
    assert bad["asr"] > 0.5 and bad["der"] == 0.5 and bad["nd_asr"] == bad["asr"]
    assert rows["clean"]["asr"] is None and rows["clean"]["clean_acc"] > 0.25
    assert json.loads(bad["stage_times_json"])["backdoor_training"] >= 0 and bad["total_s"] > 0
    assert bad["peak_rss_mb"] > 100  # the worker's own ru_maxrss
    assert bad["git_commit"] and "torch" in json.loads(bad["versions_json"])
    config = json.loads(bad["config_json"])
    assert config["attack"]["name"] == "badnets" and config["preset"]["name"] == "smoke"
    result = json.loads((Path(bad["run_dir"]) / "result.json").read_text())  # the driver wrote the run folder
    assert result["asr"] == bad["asr"]
    assert_stages_logged(Path(bad["run_dir"]) / "run.log", "run: cifar10/badnets/none, preset smoke, seed 0",
                         "data: started", "data: done in", "backdoor_training: done in", "evaluate: done in")
    assert "grid tiny" in proc.stderr and "2/2" in proc.stderr  # one bar over the grid
    assert "ran 2 (2 done, 0 failed)" in proc.stdout


def test_only_runs_the_matching_jobs_and_leaves_the_rest_unfinished(first_run, tiny_grid, mini_root,
                                                                    session_cache_dir, tmp_path):
    db = tmp_path / "results.sqlite"  # a fresh database; the backdoored models come from the session cache
    proc = cli("grid", "run", str(tiny_grid), "--db", str(db), "--data-root", str(mini_root),
               "--cache-dir", str(session_cache_dir), "--only", "cifar10/badnets/*")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran 1 (1 done, 0 failed)" in proc.stdout and "1 unfinished job(s) left out by --only" in proc.stdout
    assert {a: r["status"] for a, r in job_rows(db).items()} == {"badnets": "done", "clean": "pending"}
    proc = cli("grid", "run", str(tiny_grid), "--db", str(db), "--data-root", str(mini_root),
               "--cache-dir", str(session_cache_dir), "--only", "nothing*")
    assert proc.returncode == 0 and "ran 0" in proc.stdout and "1 unfinished job(s) left out" in proc.stdout


def test_rerun_skips_finished_jobs(first_run, tiny_grid, mini_root, session_cache_dir):
    db, _ = first_run
    before = job_rows(db)
    proc = cli("grid", "run", str(tiny_grid), "--db", str(db), "--data-root", str(mini_root),
               "--cache-dir", str(session_cache_dir))
    assert proc.returncode == 0 and "2 already finished, ran 0" in proc.stdout
    assert job_rows(db) == before


def test_rerun_done_repeats_only_the_selected_finished_jobs(first_run, tiny_grid, mini_root, session_cache_dir,
                                                           tmp_path):
    db = tmp_path / "results.sqlite"
    shutil.copy(first_run[0], db)
    before = job_rows(db)
    common = ("grid", "run", str(tiny_grid), "--db", str(db), "--data-root", str(mini_root),
              "--cache-dir", str(session_cache_dir))
    proc = cli(*common, "--rerun-done")
    assert proc.returncode == 2 and "give --only PATTERN" in proc.stderr
    assert job_rows(db) == before  # refused before anything ran
    proc = cli(*common, "--rerun-done", "--only", "cifar10/badnets/*")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 already finished, ran 1 (1 done, 0 failed)" in proc.stdout
    after = job_rows(db)
    assert after["clean"] == before["clean"]
    assert after["badnets"]["status"] == "done" and after["badnets"]["attempts"] == before["badnets"]["attempts"] + 1
    assert after["badnets"]["finished_at"] > before["badnets"]["finished_at"]
    assert after["badnets"]["asr"] == before["badnets"]["asr"]  # the same job, recomputed from the same cache


def _session_processes(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def test_a_new_database_file_never_appears_without_its_tables(tmp_path, monkeypatch):
    """A reader polling a database the driver is creating must find the tables as soon as the file exists."""
    from cgd_defense.leaderboard import db as db_module
    path = tmp_path / "results.sqlite"
    seen_without_tables = []
    real_connect = sqlite3.connect

    def watching_connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        if path.exists():
            with closing(real_connect(path)) as reader:
                if not reader.execute("SELECT name FROM sqlite_master WHERE name = 'jobs'").fetchall():
                    seen_without_tables.append(args[0])
        return conn

    monkeypatch.setattr(db_module.sqlite3, "connect", watching_connect)
    ResultsDB(path)
    assert seen_without_tables == []
    assert job_rows(path) == {} and sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]
    ResultsDB(path)  # opening an existing database keeps it
    assert job_rows(path) == {}


def _signal_driver_in_second_job(grid: Path, mini_root: Path, db: Path, cache_dir: Path, sig: int) -> tuple[int, str]:
    """Run `grid` (the tiny one) in a subprocess, send `sig` to its driver just after the second job
    (BadNets) started, and return the driver's exit status and stderr once it and every process it
    started are gone."""
    args = [sys.executable, "-m", "cgd_defense.cli", "grid", "run", str(grid), "--db", str(db),
            "--data-root", str(mini_root), "--cache-dir", str(cache_dir)]
    driver = subprocess.Popen(args, cwd=PROJECT_ROOT, env={**os.environ, "CGD_PROGRESS": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and driver.poll() is None:
            rows = job_rows(db) if db.exists() else {}
            if rows.get("clean", {}).get("status") == "done" and rows.get("badnets", {}).get("status") == "running":
                os.kill(driver.pid, sig)
                break
            time.sleep(0.02)
        _, stderr = driver.communicate(timeout=60)
        for _ in range(100):  # an orphaned worker notices its driver is gone; the fork server follows it
            if not _session_processes(driver.pid):
                break
            time.sleep(0.1)
        assert _session_processes(driver.pid) == []
    finally:
        for pid in _session_processes(driver.pid):
            os.kill(pid, signal.SIGKILL)
    return driver.returncode, stderr


def test_sigkill_loses_nothing_finished_and_repeats_only_the_interrupted_job(
        first_run, tiny_grid, mini_root, session_cache_dir, tmp_path):
    db = tmp_path / "results.sqlite"
    returncode, _ = _signal_driver_in_second_job(tiny_grid, mini_root, db, session_cache_dir, signal.SIGKILL)
    assert returncode == -signal.SIGKILL, "the driver finished before it could be killed mid-job"
    killed = job_rows(db)
    assert killed["clean"]["status"] == "done" and killed["badnets"]["status"] == "running"

    proc = cli("grid", "run", str(tiny_grid), "--db", str(db), "--data-root", str(mini_root),
               "--cache-dir", str(session_cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 already finished, ran 1" in proc.stdout and "repeated 1 job(s) interrupted" in proc.stdout
    after = job_rows(db)
    assert after["clean"] == killed["clean"]  # the finished job is untouched: not repeated
    assert after["badnets"]["status"] == "done" and after["badnets"]["attempts"] == 2
    assert after["badnets"]["asr"] == job_rows(first_run[0])["badnets"]["asr"]


def test_sigterm_stops_the_grid_like_ctrl_c_without_waiting_for_the_running_job(tiny_grid, mini_root, tmp_path):
    """A scheduler's or `kill`'s SIGTERM just after a job started (its worker new): the driver exits
    143, its worker stopped mid-job rather than waited for; the finished job stays done and the
    interrupted one goes back to pending (not `running`), so the board shows the truth and a rerun
    repeats it."""
    from cgd_defense.leaderboard.runner import job_run_dir

    db = tmp_path / "results.sqlite"
    returncode, stderr = _signal_driver_in_second_job(tiny_grid, mini_root, db, tmp_path / "cache",  # each job trains
                                                      signal.SIGTERM)
    assert returncode == 143, stderr[-3000:]
    # one line from the driver; multiprocessing's resource tracker may add a warning after it, when
    # the stopped pool left a semaphore that it then removes
    assert "terminated" in stderr.splitlines() and "Traceback" not in stderr, stderr[-3000:]
    rows = job_rows(db)
    assert rows["clean"]["status"] == "done" and rows["badnets"]["status"] == "pending"
    badnets = next(j for j in load_plan(tiny_grid).jobs if j.attack == "badnets")
    log_path = job_run_dir(tmp_path / "runs", "tiny", badnets) / "run.log"
    assert "evaluate: done" not in (log_path.read_text() if log_path.exists() else "")  # not run to its end


def test_grid_show_says_where_a_running_job_is(tiny_grid, tmp_path):
    from cgd_defense.leaderboard.runner import job_run_dir

    plan = load_plan(tiny_grid)
    db = ResultsDB(tmp_path / "results.sqlite")
    db.register(plan.spec.name, plan.jobs)
    running = next(j for j in plan.jobs if j.attack == "badnets")
    db.mark_running(running.key)
    run_dir = job_run_dir(tmp_path / "runs", plan.spec.name, running)
    run_dir.mkdir(parents=True)
    (run_dir / "run.log").write_text("2026-12-06 01:00:00 data: done in 1.0 s\n"
                                     "2026-12-06 01:00:01 train victim (badnets): epoch 2/4, loss 1.2\n")
    proc = cli("grid", "show", str(tiny_grid), "--db", str(db.path))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[3]: line for line in proc.stdout.splitlines()}
    assert lines["cifar10/badnets/none"].endswith("running      cifar10/badnets/none seed=0  | "
                                                   "2026-12-06 01:00:01 train victim (badnets): epoch 2/4, loss 1.2")
    assert "|" not in lines["cifar10/clean/none"]  # a job that is not running shows no log line


def test_missing_data_is_refused_before_any_job_starts(tiny_grid, tmp_path):
    proc = cli("grid", "run", str(tiny_grid), "--db", str(tmp_path / "r.sqlite"), "--data-root",
               str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no CIFAR-10 data found" in proc.stderr
    assert ResultsDB(tmp_path / "r.sqlite").statuses(j.key for j in load_plan(tiny_grid).jobs) == {
        j.key: "pending" for j in load_plan(tiny_grid).jobs}


def test_failed_jobs_are_recorded_and_retried_on_request(first_run, tiny_grid, mini_root, session_cache_dir, tmp_path):
    broken = tmp_path / "broken"  # looks like CIFAR-10 image folders, but holds one class: jobs fail when loading
    for split in ("train", "test"):
        (broken / split / "airplane").mkdir(parents=True)
    db_path = tmp_path / "results.sqlite"
    proc = cli("grid", "run", str(tiny_grid), "--db", str(db_path), "--data-root", str(broken),
               "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 1 and "ran 2 (0 done, 2 failed)" in proc.stdout
    rows = job_rows(db_path)
    assert {r["status"] for r in rows.values()} == {"failed"}
    assert all("missing class folders" in r["error"] and "Traceback" in r["error"] for r in rows.values())
    failed_logs = sorted((tmp_path / "runs" / "tiny").glob("*/run.log"))  # written live: kept for a failed job
    assert len(failed_logs) == 2
    for log in failed_logs:
        assert_stages_logged(log, "data: started", "data: failed after")

    plan, db = load_plan(tiny_grid), ResultsDB(db_path)
    summary = run_grid(plan, db, data_root=str(mini_root), cache_dir=str(session_cache_dir))
    assert summary.ran == 0 and summary.kept_failed == 2  # failed jobs wait for --retry-failed
    summary = run_grid(plan, db, retry_failed=True, workers=2, data_root=str(mini_root),
                       cache_dir=str(session_cache_dir))
    assert summary.succeeded == 2 and not summary.failed
    assert {(r["status"], r["attempts"], r["error"]) for r in job_rows(db_path).values()} == {("done", 2, None)}
    for log in failed_logs:  # the retry's log replaced the failed attempt's
        assert "failed" not in log.read_text()
        assert_stages_logged(log, "data: done in", "evaluate: done in")


def test_unregistered_names_recorded_as_skipped(first_run, tiny_grid, mini_root, session_cache_dir, tmp_path):
    spec = yaml.safe_load(tiny_grid.read_text())
    spec.update(name="later", attacks=["clean"], defenses=["none", "defense-of-tomorrow"])
    grid = tmp_path / "later.yaml"
    grid.write_text(yaml.safe_dump(spec))
    proc = cli("grid", "run", str(grid), "--db", str(tmp_path / "r.sqlite"))
    assert proc.returncode == 2 and "not registered: defense 'defense-of-tomorrow'" in proc.stderr
    proc = cli("grid", "run", str(grid), "--db", str(tmp_path / "r.sqlite"), "--skip-unregistered",
               "--data-root", str(mini_root), "--cache-dir", str(session_cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 job(s) recorded as skipped" in proc.stdout
    with sqlite3.connect(tmp_path / "r.sqlite") as conn:
        rows = dict(conn.execute("SELECT defense, status || ': ' || COALESCE(error, '') FROM jobs"))
    assert rows == {"none": "done: ", "defense-of-tomorrow": "skipped: not registered: defense 'defense-of-tomorrow'"}


def test_ray_backend_on_a_local_instance(first_run, tiny_grid, mini_root, session_cache_dir, tmp_path):
    pytest.importorskip("ray", reason="the Ray backend is optional: pip install 'cgd-bench[ray]'")
    db = ResultsDB(tmp_path / "ray.sqlite")
    summary = run_grid(load_plan(tiny_grid), db, backend="ray", ray_num_cpus=2, data_root=str(mini_root),
                       cache_dir=str(session_cache_dir))
    assert summary.succeeded == 2 and not summary.failed
    local = job_rows(first_run[0])
    for attack, row in job_rows(db.path).items():
        assert row["status"] == "done" and row["peak_rss_mb"] > 100
        assert (row["clean_acc"], row["asr"]) == (local[attack]["clean_acc"], local[attack]["asr"])
        assert (Path(row["run_dir"]) / "result.json").is_file()
        assert_stages_logged(Path(row["run_dir"]) / "run.log", "data: done in", "evaluate: done in")


def test_host_names_the_cpu_model_or_the_gpu(monkeypatch):
    from cgd_defense.leaderboard import runner

    monkeypatch.setattr(runner.socket, "gethostname", lambda: "vm")
    cpu = {"cpus": "2", "cpu_model": "AMD EPYC", "cuda": "none"}
    assert runner.describe_host(cpu) == "vm (2 CPUs, AMD EPYC)"
    assert runner.describe_host({**cpu, "cuda": "NVIDIA H200"}) == "vm (NVIDIA H200)"
    assert runner.describe_host({"cpus": "2", "cuda": "none"}) == "vm (2 CPUs)"  # a result written before cpu_model
