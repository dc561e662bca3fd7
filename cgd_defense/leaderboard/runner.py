"""Running a grid: the driver, its scheduling, and the local process-pool backend.

- Only the driver writes: the results database (one transaction per state change) and the run
  folders (the worker returns its files' bytes). Workers can therefore live on other machines.
- Resume: a job whose row says `done` is never run again; `failed` ones only with `retry_failed`;
  `running` rows are what a killed driver left behind and run again.
- Sharing cached stages: jobs run in grid order (all defenses of one attack and seed together), and
  with several workers the first job of each (dataset, attack, seed) group runs alone before the
  rest of its group starts, so the poisoned set and backdoored model are computed once and every
  later job of the group reads them from the pipeline's cache.
- Each local job runs in a fresh worker process (forked from a server that has already imported
  torch and the pipeline), so its peak RSS is its own, a crash or out-of-memory kill fails only the
  job, and a worker whose driver was killed exits instead of computing a result no one records.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import multiprocessing
import os
import re
import resource
import signal
import socket
import tempfile
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..errors import Terminated
from ..harness.cache import atomic_write_bytes
from ..harness.precision import keep_freed_memory
from ..harness.provenance import machine
from ..harness.stages import RUN_LOG
from ..harness.trainer import progress_enabled
from .db import ResultsDB
from .grid import GridError, GridPlan, Job

RUN_FILE_LIMIT = 32 << 20  # bytes of run-folder files (figures) a worker sends back per job
FAILURES_LISTED = 20
ABORT_WAIT_S = 30.0  # most seconds a stopped grid waits for its workers to die before it exits anyway


def execute_job(run_config: dict, torch_threads: int | None = None, live_log: str | None = None) -> dict:
    """Run one job in this (worker) process and return its outcome as plain data: the result
    dict, the run folder's files as bytes, and this process's peak memory. Never raises for a
    failing job: the error and its traceback are part of the outcome. `live_log`: a file this
    process writes the job's log to as it runs (the run folder's `run.log`, on the driver's machine),
    so a long job can be followed and a failed one keeps its log."""
    import torch

    from ..harness.pipeline import RunConfig, run
    from ..harness.stages import run_log

    os.environ["CGD_PROGRESS"] = "0"  # the grid's bar is the one progress bar
    keep_freed_memory()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    outcome: dict[str, Any] = {"host": describe_host(machine()), "files": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="cgd-job-") as tmp, \
                (run_log(live_log) if live_log else contextlib.nullcontext()):
            outcome["result"] = run(RunConfig(**run_config), tmp)
            for path in sorted(Path(tmp).iterdir()):
                if path.is_file() and path.name != "result.json" and path.stat().st_size <= RUN_FILE_LIMIT:
                    outcome["files"][path.name] = path.read_bytes()
        outcome["ok"] = True
    except Exception as exc:  # noqa: BLE001 - any failure of the job is recorded, the grid goes on
        outcome.update(ok=False, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process ran this job alone
    outcome["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    outcome["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # CPU seconds: the cost on a shared machine
    outcome["peak_gpu_mb"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                              if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    return outcome


def describe_host(machine_info: dict) -> str:
    """The host name and what the job ran on (`provenance.machine()`), so that a wall time can be
    read: 'vm (NVIDIA H200)', 'vm (2 CPUs, AMD EPYC)'."""
    gpu = machine_info.get("cuda")
    if gpu and gpu != "none":
        return f"{socket.gethostname()} ({gpu})"
    cpus = f"{machine_info.get('cpus', '?')} CPUs"
    model = machine_info.get("cpu_model")
    return f"{socket.gethostname()} ({cpus}, {model})" if model else f"{socket.gethostname()} ({cpus})"


# ---------------------------------------------------------------------------------------------- backends

class Backend(Protocol):
    capacity: int  # jobs in flight at once

    def submit(self, job: Job, run_config: dict, live_log: Path) -> Any:
        """Start the job; a backend whose workers share the driver's filesystem writes the job's log
        to `live_log` as it runs."""

    def wait(self, handles: list) -> list[tuple[Any, dict]]:
        """Block until at least one handle finished; return (handle, outcome) for each finished one."""

    def close(self, abort: bool = False) -> None:
        """Release the workers; `abort`: the grid stopped early, stop running jobs too."""


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a killed, not yet reaped driver is a zombie
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _exit_when_driver_dies(driver_pid: int) -> None:
    # The worker's parent is the fork server, which outlives the driver as long as any worker runs
    # (each holds the server's keep-alive pipe), so the driver itself is watched.
    while _process_alive(driver_pid):
        time.sleep(1.0)
    os._exit(3)


def _init_local_worker(driver_pid: int) -> None:
    threading.Thread(target=_exit_when_driver_dies, args=(driver_pid,), daemon=True).start()


class LocalBackend:
    """`workers` jobs at a time, each in a fresh process; torch threads split among them."""

    def __init__(self, workers: int = 1):
        self.capacity = max(1, workers)
        self.threads = max(1, (os.cpu_count() or 1) // self.capacity) if self.capacity > 1 else None
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["torch", "cgd_defense.harness.pipeline", __name__])
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.capacity, mp_context=self._ctx, max_tasks_per_child=1,
                                   initializer=_init_local_worker, initargs=(os.getpid(),))

    def submit(self, job: Job, run_config: dict, live_log: Path) -> Future:
        with stops_held():  # a submit may start a worker process
            return self._pool.submit(execute_job, run_config, self.threads, str(live_log))

    def wait(self, handles: list) -> list[tuple[Any, dict]]:
        done, _ = wait_futures(handles, return_when=FIRST_COMPLETED)
        out, broken = [], False
        for fut in done:
            try:
                out.append((fut, fut.result()))
            except BrokenProcessPool as exc:
                broken = True
                out.append((fut, {"ok": False, "error": f"the worker process died while this job ran (killed, or "
                                                        f"out of memory?): {exc}"}))
        if broken:  # a dead worker breaks the whole pool: start a new one for the remaining jobs
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        return out

    def close(self, abort: bool = False) -> None:
        if not abort:
            self._pool.shutdown(wait=True)
            return
        # A stopped grid (Ctrl-C, SIGTERM, error) leaves no worker computing a result no one records.
        # Before Python 3.14 the pool has no public way to stop running tasks, so its workers are
        # terminated directly, and again until its manager thread, seeing a dead worker, has failed
        # the pool and ended: just after a job ends that thread starts a replacement worker
        # (max_tasks_per_child=1), which a single pass could miss and which would take the queued
        # job; and the interpreter joins that thread at exit, so a worker left running would hold
        # the stopped driver until its job was done. Only then is the pool shut down: shutting it
        # down first takes away the state the manager thread still reads.
        pool = self._pool
        manager = getattr(pool, "_executor_manager_thread", None)
        workers = getattr(pool, "_processes", None)  # the live dict: the manager adds replacements to it
        deadline = time.monotonic() + ABORT_WAIT_S
        while manager is not None and manager.is_alive() and time.monotonic() < deadline:
            for proc in list((workers or {}).values()):
                proc.terminate()
            manager.join(0.05)
        pool.shutdown(wait=False, cancel_futures=True)


_stop_hold = {"depth": 0, "pending": None}  # see `stops_held`


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c():
    """While the block runs, SIGTERM (a scheduler's or `kill`'s stop) raises `Terminated`, a
    KeyboardInterrupt, so the grid stops as on Ctrl-C: running jobs back to pending, workers stopped.
    Both wait while `stops_held` holds them."""
    def stop(signum, frame):
        error = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if _stop_hold["depth"]:
            _stop_hold["pending"] = _stop_hold["pending"] or error
            return
        raise error

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stops_held():
    """Under `sigterm_stops_like_ctrl_c`, Ctrl-C and SIGTERM wait until the block is done. Around a
    submit: a worker process interrupted while being started is left half-made and prints a
    traceback of its own. (Blocking the signals with a thread mask would not do: any other thread,
    e.g. one of torch's, can receive them and Python still runs the handler in the main thread.)"""
    _stop_hold["depth"] += 1
    try:
        yield
    finally:
        _stop_hold["depth"] -= 1
        if not _stop_hold["depth"] and _stop_hold["pending"] is not None:
            error, _stop_hold["pending"] = _stop_hold["pending"], None
            raise error


# ---------------------------------------------------------------------------------------------- driver

@dataclass
class GridRunSummary:
    grid: str
    total: int
    already_done: int
    ran: int = 0
    succeeded: int = 0
    failed: list[str] = field(default_factory=list)
    skipped_unregistered: int = 0
    kept_failed: int = 0
    repeated_interrupted: int = 0
    left_out: int = 0
    elapsed_s: float = 0.0
    job_seconds: list[float] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"grid {self.grid}: {self.total} job(s); {self.already_done} already finished, ran {self.ran} "
               f"({self.succeeded} done, {len(self.failed)} failed) in {self.elapsed_s:.0f} s"]
        if self.repeated_interrupted:
            out.append(f"repeated {self.repeated_interrupted} job(s) interrupted in an earlier run")
        if self.skipped_unregistered:
            out.append(f"{self.skipped_unregistered} job(s) recorded as skipped: attack or defense not registered")
        if self.kept_failed:
            out.append(f"{self.kept_failed} job(s) failed earlier and were not retried (use --retry-failed)")
        if self.left_out:
            out.append(f"{self.left_out} unfinished job(s) left out by --only")
        out.extend(f"failed: {name}" for name in self.failed[:FAILURES_LISTED])
        if len(self.failed) > FAILURES_LISTED:
            out.append(f"... and {len(self.failed) - FAILURES_LISTED} more failed jobs (see `cgd-bench grid show`)")
        return out


def runs_root_of(db: ResultsDB, runs_dir: str | os.PathLike | None = None) -> Path:
    """The folder of run folders: `runs_dir`, or runs/ beside the database."""
    return Path(runs_dir).expanduser() if runs_dir else db.path.parent / "runs"


def job_run_dir(runs_root: Path, grid: str, job: Job) -> Path:
    """A job's run folder: result.json, run.log and any figures."""
    parts = [job.dataset, job.attack_label, job.defense_label] + ([job.clip] if job.clip else []) + \
            [f"s{job.seed}", job.key[:10]]
    return runs_root / grid / re.sub(r"[^A-Za-z0-9_.=,+-]+", "-", "__".join(parts))


def last_log_line(run_dir: Path) -> str | None:
    """The newest line of a job's run.log (where a running job is), if it has one."""
    try:
        with open(run_dir / RUN_LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return lines[-1] if lines else None


def _write_run_dir(run_dir: Path, outcome: dict) -> None:
    for name, data in outcome.get("files", {}).items():
        atomic_write_bytes(run_dir / name, data)
    atomic_write_bytes(run_dir / "result.json", json.dumps(outcome["result"], indent=2).encode())


class _Scheduler:
    """Hands out jobs in grid order; a group's first job runs alone before the rest of its group."""

    def __init__(self, jobs: list[Job]):
        self.queue = list(jobs)
        self.leader_running: set[tuple] = set()
        self.opened: set[tuple] = set()

    def next(self) -> Job | None:
        for i, job in enumerate(self.queue):
            group = job.stage_group
            if group in self.opened:
                return self.queue.pop(i)
            if group not in self.leader_running:
                self.leader_running.add(group)
                return self.queue.pop(i)
        return None

    def finished(self, job: Job) -> None:
        group = job.stage_group
        self.leader_running.discard(group)
        self.opened.add(group)


def unregistered_error(plan: GridPlan) -> GridError:
    names = plan.unregistered_names
    n_jobs = len(plan.jobs) - len(plan.runnable)
    return GridError(f"grid '{plan.spec.name}' lists names that are not registered: {', '.join(names)} "
                     f"({n_jobs} of {len(plan.jobs)} jobs). Register them, remove them from {plan.source}, or "
                     f"pass --skip-unregistered to record those jobs as skipped")


def run_grid(plan: GridPlan, db: ResultsDB, *, backend: str = "local", workers: int = 1,
             retry_failed: bool = False, skip_unregistered: bool = False, data_root: str | None = None,
             cache_dir: str | None = None, device: str | None = None, runs_dir: str | os.PathLike | None = None,
             address: str | None = None, cpus_per_job: float | None = None, gpus_per_job: float | None = None,
             ray_num_cpus: int | None = None, only: list[str] | None = None,
             rerun_done: bool = False) -> GridRunSummary:
    """Run every unfinished job of `plan` (with `only`, those whose description, e.g.
    'cifar10/badnets/asd seed=0', matches one of these shell patterns), recording each in `db` as it
    finishes. `rerun_done` also runs the finished jobs that `only` selects (after a fix), each row
    replaced when its job finishes again."""
    if plan.unregistered_names and not skip_unregistered:
        raise unregistered_error(plan)
    if rerun_done and not only:
        raise GridError("--rerun-done runs again the finished jobs that --only selects: give --only PATTERN "
                        "(to rerun a whole grid, run it into a new database with --db)")

    def selected(job: Job) -> bool:
        return any(fnmatch.fnmatchcase(job.describe(), pattern) for pattern in only)

    grid = plan.spec.name
    runs_root = runs_root_of(db, runs_dir)
    db.register(grid, plan.jobs)
    status = db.statuses(j.key for j in plan.jobs)
    summary = GridRunSummary(grid=grid, total=len(plan.jobs), already_done=0)
    to_run = []
    for job in plan.jobs:
        state = status.get(job.key, "pending")
        if job.unregistered:
            db.mark_skipped(job.key, "not registered: " + ", ".join(job.unregistered))
            summary.skipped_unregistered += 1
        elif state == "done" and not (rerun_done and selected(job)):
            summary.already_done += 1
        elif state == "failed" and not retry_failed:
            summary.kept_failed += 1
        else:
            to_run.append(job)
    if only:
        chosen = [j for j in to_run if selected(j)]
        summary.left_out = len(to_run) - len(chosen)  # finished jobs are in to_run only when selected
        to_run = chosen
    summary.repeated_interrupted = sum(status.get(j.key) == "running" for j in to_run)

    if not to_run:
        return summary
    if backend == "local" or address is None:  # the data is on this machine: check it before any job starts
        from ..data.datasets import locate

        for dataset in plan.spec.datasets:
            locate(dataset, data_root)
    if backend == "local":
        executor: Backend = LocalBackend(workers)
    elif backend == "ray":
        from .ray_backend import RayBackend

        resources = plan.spec.resources
        executor = RayBackend(address=address, cpus_per_job=cpus_per_job or resources.cpus,
                              gpus_per_job=gpus_per_job if gpus_per_job is not None else resources.gpus,
                              max_in_flight=workers if workers > 1 else None, num_cpus=ray_num_cpus)
    else:
        raise GridError(f"unknown backend '{backend}': use local or ray")

    from tqdm.auto import tqdm

    in_scope = len(plan.jobs) - summary.left_out  # the bar counts what this run could finish
    bar = tqdm(total=in_scope, initial=in_scope - len(to_run), desc=f"grid {grid}", unit="job",
               disable=not progress_enabled(), dynamic_ncols=True)
    scheduler = _Scheduler(to_run)
    in_flight: dict[Any, Job] = {}
    unrecorded: set[str] = set()  # jobs marked running and not yet recorded: a stop puts them back to pending
    t0 = time.perf_counter()
    aborted = True
    try:
        while scheduler.queue or in_flight:
            while len(in_flight) < executor.capacity and (job := scheduler.next()) is not None:
                unrecorded.add(job.key)
                db.mark_running(job.key)
                cfg = job.run_config(data_root=data_root, cache_dir=cache_dir, device=device)
                live_log = job_run_dir(runs_root, grid, job) / RUN_LOG
                in_flight[executor.submit(job, cfg.model_dump(mode="json"), live_log)] = job
                bar.set_postfix_str(job.describe(), refresh=True)
            for handle, outcome in executor.wait(list(in_flight)):
                job = in_flight.pop(handle)
                scheduler.finished(job)
                _record(db, job, outcome, job_run_dir(runs_root, grid, job), summary, bar.write)
                unrecorded.discard(job.key)
                bar.update(1)
        aborted = False
    except BaseException:
        db.mark_pending(unrecorded)
        raise
    finally:
        bar.close()
        executor.close(abort=aborted)
        summary.elapsed_s = time.perf_counter() - t0
    return summary


def _record(db: ResultsDB, job: Job, outcome: dict, run_dir: Path, summary: GridRunSummary,
            note: Callable[[str], None]) -> None:
    summary.ran += 1
    if outcome.get("ok"):
        _write_run_dir(run_dir, outcome)
        db.record_result(job.key, outcome["result"], peak_rss_mb=outcome.get("peak_rss_mb"),
                         peak_gpu_mb=outcome.get("peak_gpu_mb"), cpu_s=outcome.get("cpu_s"), host=outcome.get("host"),
                         run_dir=str(run_dir))
        summary.succeeded += 1
        summary.job_seconds.append((outcome["result"].get("stage_times") or {}).get("total") or 0.0)
    else:
        error = outcome.get("error") or "unknown error"
        db.record_failure(job.key, error, peak_rss_mb=outcome.get("peak_rss_mb"), host=outcome.get("host"))
        summary.failed.append(f"{job.describe()}: {error.splitlines()[0]}")
        note(f"job failed: {job.describe()}: {error.splitlines()[0]}")
