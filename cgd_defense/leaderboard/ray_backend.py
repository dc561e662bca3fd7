"""Ray backend: each job a Ray task with its own CPU/GPU request, on an existing cluster
(`address`, e.g. "auto" or "ray://head:10001") or on a local instance started for the run.

Tasks run `runner.execute_job` and return its outcome (result, run-folder files, peak memory);
the driver alone writes the database and the run folders. `max_calls=1` gives every job a fresh
worker process, so the recorded peak memory is that job's and GPU memory is released between jobs.
Every node needs cgd-bench installed and the dataset at the path the job names (`--data-root`);
pointing `CGD_CACHE_DIR` at a shared filesystem lets nodes share poisoned sets and models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CGDError
from .grid import Job
from .runner import execute_job


class RayBackend:
    def __init__(self, address: str | None = None, cpus_per_job: float = 1, gpus_per_job: float = 0,
                 max_in_flight: int | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise CGDError("the ray backend needs Ray: pip install 'cgd-bench[ray]'") from None
        self._ray = ray
        self._started_here = not ray.is_initialized()
        if self._started_here:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = max_in_flight or 10_000  # Ray queues tasks by their resource requests
        if cpus_per_job > cluster_cpus:
            raise CGDError(f"each job asks for {cpus_per_job} CPUs but the Ray cluster has {cluster_cpus}")
        self._task = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_calls=1,
                                max_retries=0)(execute_job)
        self._threads = max(1, int(cpus_per_job))
        self._submitted: list = []

    def submit(self, job: Job, run_config: dict, live_log: Path) -> Any:
        # No live log: a worker on another node cannot write the driver's run folder. The job's
        # run.log comes back with its other run-folder files when it finishes.
        ref = self._task.remote(run_config, self._threads)
        self._submitted.append(ref)
        return ref

    def wait(self, handles: list) -> list[tuple[Any, dict]]:
        done, _ = self._ray.wait(handles, num_returns=1)
        out = []
        for ref in done:
            try:
                out.append((ref, self._ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - a crashed worker fails its job, not the grid
                out.append((ref, {"ok": False, "error": f"Ray task failed: {type(exc).__name__}: {exc}"}))
        return out

    def close(self, abort: bool = False) -> None:
        if abort:
            for ref in self._submitted:
                self._ray.cancel(ref, force=True)
        if self._started_here:
            self._ray.shutdown()
