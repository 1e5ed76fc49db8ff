"""The Prefect cache policy of the pipeline, and the one way the flows call a cached task.

Prefect's default ``INPUTS`` policy hashes the call's arguments with cloudpickle. Our tasks take a job spec
(:mod:`tasks.jobs`) whose :attr:`~tasks.jobs.Job.key` already says exactly what determines the result, so the
policy just uses it: readable, stable across processes and Prefect versions, and the same key names the artifact.

A cache record outlives the artifact it points at (someone cleans the store): :func:`run_cached` therefore checks
the artifact first and refreshes the cache when it is gone, so the step is recomputed instead of handing back a
dangling URI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from prunecomp.storage import is_complete
from tasks.jobs import Job

__all__ = ["JOB_KEY", "JobKey", "run_cached"]


@dataclass
class JobKey(CachePolicy):
    """Cache key = ``<task name>-<job.key>`` of the task's ``job`` argument; no job, no caching."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        job = inputs.get("job")
        if not isinstance(job, Job):
            return None
        return f"{task_ctx.task.name}-{job.key}"


JOB_KEY = JobKey()


def run_cached(task: Task[..., Any], job: Job) -> tuple[Any, bool]:
    """Run ``task(job)`` through the cache; returns ``(result, came_from_cache)``.

    ``refresh_cache`` is set when the job's artifact is missing, so a stale record is overwritten by a fresh
    computation rather than returned.
    """
    refresh = not is_complete(job.uri)
    state = task.with_options(refresh_cache=refresh)(job=job, return_state=True)
    result = state.result()
    return result, state.name == "Cached"
