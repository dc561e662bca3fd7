"""Stage timing and the run log.

Every stage of a run (data, backdoor training, each stage of a defense) is timed into a dict, the
`stage_times` of result.json, and announced on the `cgd_defense` logger when it starts and ends.
`run_log` sends those lines (and every other `cgd_defense` log line) to a file: `run.log` in a run
folder, which a grid job also writes live beside its results, so a job that takes an hour says
which stage it is in while it runs.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

PACKAGE_LOGGER = "cgd_defense"
RUN_LOG = "run.log"  # the run folder's log: each stage's start and end, with timestamps
log = logging.getLogger(f"{PACKAGE_LOGGER}.stages")


@contextmanager
def timed_stage(times: dict[str, float], name: str, label: str | None = None):
    """Time the block into `times[name]` (summed when a stage recurs, e.g. one split per epoch), also
    when it raises, and log its start and end under `label` (default: `name`)."""
    name_in_log = label or name
    log.info("%s: started", name_in_log)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        log.info("%s: failed after %.1f s", name_in_log, time.perf_counter() - t0)
        raise
    finally:
        elapsed = time.perf_counter() - t0
        times[name] = round(times.get(name, 0.0) + elapsed, 3)
    log.info("%s: done in %.1f s", name_in_log, elapsed)


class StageTimer:
    """`with timer("name"): ...` times stages into `timer.times`."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        return timed_stage(self.times, name)


@contextmanager
def run_log(path: str | Path):
    """Write the package's INFO-and-above log lines to `path` (a new file) while the block runs, each
    line starting with a timestamp; the package logger's level is restored afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger(PACKAGE_LOGGER)
    previous_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        handler.close()
