"""The results database: one SQLite file, one row per job, written only by the grid driver.

Each state change is one transaction, committed before the driver moves on, so a driver killed at
any instant leaves every finished job recorded and at most the jobs it had started marked `running`
(they count as unfinished and run again). Rows are keyed by the job key (hash of the resolved
configuration, see `grid.py`); `grid_jobs` records which grid lists which job, in run order, so one
database can hold several grids and a job shared by two grids runs once.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable

from ..config import PROJECT_ROOT
from .grid import Job

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed", "skipped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_key         TEXT PRIMARY KEY,
    dataset         TEXT NOT NULL,
    preset          TEXT NOT NULL,
    attack          TEXT NOT NULL,
    attack_label    TEXT NOT NULL,
    attack_family   TEXT,
    defense         TEXT NOT NULL,
    defense_label   TEXT NOT NULL,
    threat_model    TEXT,
    clip            TEXT,
    seed            INTEGER NOT NULL,
    config_json     TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'skipped')),
    error           TEXT,
    clean_acc       REAL,
    asr             REAL,
    ra              REAL,
    der             REAL,
    nd_clean_acc    REAL,
    nd_asr          REAL,
    nd_ra           REAL,
    split_json      TEXT,
    stage_times_json TEXT,
    total_s         REAL,
    peak_rss_mb     REAL,
    peak_gpu_mb     REAL,
    cpu_s           REAL,
    clip_info_json  TEXT,
    data_json       TEXT,
    git_commit      TEXT,
    versions_json   TEXT,
    result_json     TEXT,
    run_dir         TEXT,
    host            TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL
);
CREATE TABLE IF NOT EXISTS grid_jobs (
    grid     TEXT NOT NULL,
    job_key  TEXT NOT NULL REFERENCES jobs (job_key),
    position INTEGER NOT NULL,
    PRIMARY KEY (grid, job_key)
);
"""

JSON_COLUMNS = ("config_json", "split_json", "stage_times_json", "clip_info_json", "data_json", "versions_json",
                "result_json")


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def default_db_path() -> Path:
    env = os.environ.get("CGD_RESULTS_DB")
    return Path(env).expanduser() if env else PROJECT_ROOT / "leaderboard" / "results.sqlite"


def clip_info(result: dict) -> dict | None:
    """The CLIP settings a run recorded (`result['clip_info']`: spec, stand-in or pretrained, weights
    identity, prompts, calibration); None for runs that used no CLIP."""
    info = result.get("clip_info")
    return info if isinstance(info, dict) else None


class ResultsDB:
    """`ResultsDB(path)`; every method is one transaction. Reading is safe while a driver writes."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._create_atomically()
        with closing(self._connect()) as conn, conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _create_atomically(self) -> None:
        """Build the schema in a private file and link it into place, so that a reader never finds the
        database file without its tables (SQLite creates the file on connect, before any schema)."""
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.creating")
        try:
            with closing(sqlite3.connect(staging)) as conn, conn:
                conn.executescript(_SCHEMA)
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            try:
                os.link(staging, self.path)  # unlike a rename, fails rather than replace a database another process made
            except FileExistsError:
                pass
        finally:
            staging.unlink(missing_ok=True)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous = FULL")  # a commit survives a kill of the process at any instant
        return conn

    # ------------------------------------------------------------------------------------------ writes

    def register(self, grid: str, jobs: Iterable[Job]) -> None:
        """Record the grid's current job list (its order and membership) and add rows for new jobs."""
        now = time.time()
        with closing(self._connect()) as conn, conn:
            conn.execute("DELETE FROM grid_jobs WHERE grid = ?", (grid,))
            for job in jobs:
                conn.execute(
                    "INSERT INTO jobs (job_key, dataset, preset, attack, attack_label, attack_family, "
                    "defense, defense_label, threat_model, clip, seed, config_json, status, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?) "
                    "ON CONFLICT (job_key) DO UPDATE SET attack_label = excluded.attack_label, "
                    "defense_label = excluded.defense_label, attack_family = excluded.attack_family, "
                    "threat_model = excluded.threat_model, clip = excluded.clip",
                    (job.key, job.dataset, job.preset, job.attack, job.attack_label, job.attack_family, job.defense,
                     job.defense_label, job.threat_model, job.resolved.get("clip", job.clip), job.seed,
                     json.dumps(job.resolved or {"unresolved": job.describe()}, sort_keys=True), now))
                conn.execute("INSERT INTO grid_jobs VALUES (?, ?, ?)", (grid, job.key, job.position))

    def mark_skipped(self, key: str, reason: str) -> None:
        with closing(self._connect()) as conn, conn:
            conn.execute("UPDATE jobs SET status = 'skipped', error = ?, finished_at = ? WHERE job_key = ?",
                         (reason, time.time(), key))

    def mark_running(self, key: str) -> None:
        with closing(self._connect()) as conn, conn:
            conn.execute("UPDATE jobs SET status = 'running', error = NULL, started_at = ?, finished_at = NULL, "
                         "attempts = attempts + 1 WHERE job_key = ?", (time.time(), key))

    def mark_pending(self, keys: Iterable[str]) -> None:
        with closing(self._connect()) as conn, conn:
            conn.executemany("UPDATE jobs SET status = 'pending' WHERE job_key = ? AND status = 'running'",
                             [(k,) for k in keys])

    def record_failure(self, key: str, error: str, peak_rss_mb: float | None = None, host: str | None = None) -> None:
        with closing(self._connect()) as conn, conn:
            conn.execute("UPDATE jobs SET status = 'failed', error = ?, peak_rss_mb = ?, host = ?, finished_at = ? "
                         "WHERE job_key = ?", (error, peak_rss_mb, host, time.time(), key))

    def record_result(self, key: str, result: dict, *, peak_rss_mb: float | None, peak_gpu_mb: float | None,
                      host: str | None, run_dir: str | None, cpu_s: float | None = None) -> None:
        nd = result.get("no_defense") or {}
        with closing(self._connect()) as conn, conn:
            conn.execute(
                "UPDATE jobs SET status = 'done', error = NULL, clean_acc = ?, asr = ?, ra = ?, der = ?, "
                "nd_clean_acc = ?, nd_asr = ?, nd_ra = ?, split_json = ?, stage_times_json = ?, total_s = ?, "
                "peak_rss_mb = ?, peak_gpu_mb = ?, cpu_s = ?, clip_info_json = ?, data_json = ?, git_commit = ?, "
                "versions_json = ?, result_json = ?, run_dir = ?, host = ?, finished_at = ? WHERE job_key = ?",
                (result.get("clean_acc"), result.get("asr"), result.get("ra"), result.get("der"),
                 nd.get("clean_acc"), nd.get("asr"), nd.get("ra"), _json_or_none(result.get("split")),
                 _json_or_none(result.get("stage_times")), (result.get("stage_times") or {}).get("total"),
                 peak_rss_mb, peak_gpu_mb, cpu_s, _json_or_none(clip_info(result)), _json_or_none(result.get("data")),
                 result.get("git_commit"), _json_or_none(result.get("versions")), _json_or_none(result), run_dir, host,
                 time.time(), key))

    def import_rows(self, rows: Iterable[dict]) -> tuple[int, int, int]:
        """Add jobs exported elsewhere (`build.read_results_csv`) and their grid membership: finished
        ones with their results, unfinished ones as pending (unless this database knows the job
        already), so that the grids' pending work survives an export and import. A job this database
        already had as done keeps its own, fuller row. Returns the number of finished jobs added, of
        finished jobs kept and of pending jobs added (a job listed by several grids counts once)."""
        added: set[str] = set()
        pending: set[str] = set()
        positions: dict[str, int] = {}
        with closing(self._connect()) as conn, conn:
            done_before = {r[0] for r in conn.execute("SELECT job_key FROM jobs WHERE status = 'done'")}
            kept = set()
            for row in rows:
                position = positions[row["grid"]] = positions.get(row["grid"], -1) + 1
                conn.execute("INSERT OR IGNORE INTO grid_jobs VALUES (?, ?, ?)",
                             (row["grid"], row["job_key"], position))
                if row["status"] != "done":
                    inserted = conn.execute(
                        "INSERT OR IGNORE INTO jobs (job_key, dataset, preset, attack, attack_label, attack_family, "
                        "defense, defense_label, threat_model, clip, seed, config_json, status, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                        (row["job_key"], row["dataset"], row["preset"], row["attack"], row["attack_label"],
                         row["attack_family"], row["defense"], row["defense_label"], row["threat_model"],
                         row["clip"], row["seed"], _json_or_none(row["config"]), time.time())).rowcount
                    if inserted:
                        pending.add(row["job_key"])
                    continue
                if row["job_key"] in done_before:
                    kept.add(row["job_key"])
                    continue
                conn.execute("DELETE FROM jobs WHERE job_key = ?", (row["job_key"],))
                conn.execute(
                    "INSERT INTO jobs (job_key, dataset, preset, attack, attack_label, attack_family, defense, "
                    "defense_label, threat_model, clip, seed, config_json, status, clean_acc, asr, ra, der, "
                    "nd_clean_acc, nd_asr, nd_ra, split_json, stage_times_json, total_s, peak_rss_mb, peak_gpu_mb, "
                    "cpu_s, clip_info_json, data_json, git_commit, host, error, created_at, finished_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'done', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?, ?, ?, ?)",
                    (row["job_key"], row["dataset"], row["preset"], row["attack"], row["attack_label"],
                     row["attack_family"], row["defense"], row["defense_label"], row["threat_model"], row["clip"],
                     row["seed"], _json_or_none(row["config"]), row["clean_acc"], row["asr"], row["ra"], row["der"],
                     row["nd_clean_acc"], row["nd_asr"], row["nd_ra"], _json_or_none(row["split"]),
                     _json_or_none(row["stage_times"]), row["total_s"], row["peak_rss_mb"], row["peak_gpu_mb"],
                     row["cpu_s"], _json_or_none(row["clip_info"]), _json_or_none(row["data"]), row["git_commit"],
                     row["host"], row["error"], time.time(), row["finished_at"]))
                added.add(row["job_key"])
        return len(added), len(kept), len(pending)

    # ------------------------------------------------------------------------------------------ reads

    def statuses(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(keys)
        out: dict[str, str] = {}
        with closing(self._connect()) as conn:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(f"SELECT job_key, status FROM jobs WHERE job_key IN ({marks})", chunk):
                    out[row["job_key"]] = row["status"]
        return out

    def rows(self, grids: Iterable[str] | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Jobs listed by the given grids (default: every grid), in grid order, with JSON columns
        decoded and the grid name attached."""
        grids = list(grids or [])
        where, args = [], []
        if grids:
            where.append(f"g.grid IN ({','.join('?' * len(grids))})")
            args.extend(grids)
        if status:
            where.append("j.status = ?")
            args.append(status)
        sql = ("SELECT g.grid AS grid, g.position AS position, j.* FROM grid_jobs g JOIN jobs j USING (job_key)"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY g.grid, g.position")
        with closing(self._connect()) as conn:
            rows = [dict(r) for r in conn.execute(sql, args)]
        for row in rows:
            for col in JSON_COLUMNS:
                row[col[:-5]] = json.loads(row.pop(col)) if row.get(col) else None
        return rows

    def grids(self) -> list[str]:
        with closing(self._connect()) as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT grid FROM grid_jobs ORDER BY grid")]

    def counts(self, grid: str) -> dict[str, int]:
        with closing(self._connect()) as conn:
            found = dict(conn.execute("SELECT j.status, COUNT(*) FROM grid_jobs g JOIN jobs j USING (job_key) "
                                      "WHERE g.grid = ? GROUP BY j.status", (grid,)).fetchall())
        return {s: found.get(s, 0) for s in STATUSES}
