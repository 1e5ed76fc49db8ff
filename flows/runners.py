"""Which Prefect task runner executes a flow's fanned-out tasks (today: PPL-on-skip candidate shares).

``threads`` (default) runs them in the flow's process; ``dask`` starts a local Dask cluster of N single-threaded
worker processes; ``dask:<scheduler address>`` (e.g. ``dask:tcp://10.0.0.5:8786``) uses a running cluster whose
workers have this project installed and can read the store (S3 for a cluster of machines). Deployments choose with
the ``PRUNECOMP_TASK_RUNNER`` environment variable of their work pool.
"""

from __future__ import annotations

import os
from typing import Any

from prunecomp.errors import PrunecompError

__all__ = ["TASK_RUNNER_ENV", "task_runner"]

TASK_RUNNER_ENV = "PRUNECOMP_TASK_RUNNER"


def task_runner(spec: str | None = None, workers: int | None = None) -> Any:
    """A task runner for ``spec`` (default ``$PRUNECOMP_TASK_RUNNER``, else ``threads``) with ``workers`` slots
    (default: Prefect's thread pool size; one Dask worker per CPU)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    spec = spec or os.environ.get(TASK_RUNNER_ENV) or "threads"
    if spec == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if spec == "dask" or spec.startswith("dask:"):
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise PrunecompError("the dask task runner needs prefect-dask: pip install 'prunecomp[dask]'") from exc
        if spec == "dask":
            return DaskTaskRunner(cluster_kwargs={"n_workers": workers or os.cpu_count() or 1, "threads_per_worker": 1,
                                                  "processes": True, "dashboard_address": None})
        return DaskTaskRunner(address=spec.removeprefix("dask:"))
    raise PrunecompError(f"task runner {spec!r}: expected threads, dask, or dask:<scheduler address>")
