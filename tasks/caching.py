"""The Prefect cache policy of the pipeline, the serializer of its cached results, and the one way the flows call
a cached task.

Prefect's default ``INPUTS`` policy hashes the call's arguments with cloudpickle. Our tasks take a job spec
(:mod:`tasks.jobs`) whose :attr:`~tasks.jobs.Job.key` already says exactly what determines the result, so the
policy just uses it: readable, stable across processes and Prefect versions, and the same key names the artifact.

A cache record outlives the artifact it points at (someone cleans the store): :func:`run_cached` therefore checks
the artifact first and refreshes the cache when it is gone, so the step is recomputed instead of handing back a
dangling URI.

Results are plain documents (URIs, hashes, records: what the artifact's own JSON holds), stored as JSON, never
pickled: result storage is often shared (S3), and whoever can write a pickle there runs code in every process
that reads it. Two things make that hold. Every cached task persists with :data:`RESULT_SERIALIZER`, Prefect's
JSON serializer without its object hooks (its default decoder imports and builds any class a ``__class__`` key
names). And Prefect reads a record with whatever serializer the record itself names, so the cache policy reads
the stored record's raw bytes first (:func:`stored_record_issue`): a record that is not plain JSON of that
serializer is never looked up (the task computes), and :func:`run_cached` replaces it with a fresh one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.serializers import JSONSerializer

from prunecomp.models.storage import is_complete
from tasks.jobs import Job

__all__ = ["JOB_KEY", "RESULT_SERIALIZER", "JobKey", "cache_key", "json_result", "run_cached", "stored_record_issue"]

RESULT_SERIALIZER = JSONSerializer(object_encoder=None, object_decoder=None)
"""Plain ``json``: a result that is not a JSON document fails when it is written, and nothing is built from a
stored record but dicts, lists, strings and numbers."""

_EXPECTED = RESULT_SERIALIZER.model_dump(mode="json")


def cache_key(task_name: str, job: Job) -> str:
    """The cache record's key (and its path in result storage): ``<task name>-<job.key>``."""
    return f"{task_name}-{job.key}"


@dataclass
class JobKey(CachePolicy):
    """Cache key = ``<task name>-<job.key>`` of the task's ``job`` argument; no job, no caching."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        job = inputs.get("job")
        if not isinstance(job, Job):
            return None
        key = cache_key(task_ctx.task.name, job)
        if not task_ctx.task.refresh_cache and stored_record_issue(task_ctx.task, key) is not None:
            return None  # not cached this time, so never read (a refreshing call, as run_cached's, replaces it)
        return key


JOB_KEY = JobKey()


def json_result(value: Any) -> Any:
    """``value`` as its JSON document reads back (tuples as lists, keys as strings; what ``default=str`` makes of
    anything else, as the artifacts' own JSON files): a task returns this, so a fresh result and a cached one
    are the same value."""
    return json.loads(json.dumps(value, default=str))


def stored_record_issue(task: Task[..., Any], key: str) -> str | None:
    """Why the result record stored under ``key`` for ``task`` must not be read, or ``None`` when there is none
    or it is plain JSON written with :data:`RESULT_SERIALIZER`. Reads the raw bytes, deserialising nothing."""
    from prefect._internal.compatibility.blocks import call_explicitly_sync_block_method
    from prefect.results import get_result_store

    store = get_result_store().update_for_task(task)

    def read(storage: Any, path: str) -> bytes | None:
        try:
            return bytes(call_explicitly_sync_block_method(storage, "read_path", (path,), {}))
        except Exception:  # absent (or unreadable, and then Prefect finds no record either)
            return None

    try:
        if store.metadata_storage is not None:
            raw_meta = read(store.metadata_storage, key)
            if raw_meta is None:
                return None
            meta = json.loads(raw_meta)
            payload: Any = read(store.result_storage, str(meta.get("storage_key")))
        else:
            raw = read(store.result_storage, key)
            if raw is None:
                return None
            doc = json.loads(raw)
            meta, payload = doc.get("metadata") or {}, doc.get("result")
        serializer = meta.get("serializer")
        if serializer != _EXPECTED:
            kind = serializer.get("type") if isinstance(serializer, dict) else serializer
            return f"it names the serializer {kind!r} with other settings than this pipeline's plain JSON"
        if not isinstance(payload, str | bytes):
            return "its result is not a JSON document"
        json.loads(payload)
    except (ValueError, AttributeError, TypeError) as exc:
        return f"it is not plain JSON ({type(exc).__name__})"
    return None


def _log() -> Any:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def run_cached(task: Task[..., Any], job: Job) -> tuple[Any, bool]:
    """Run ``task(job)`` through the cache; returns ``(result, came_from_cache)``.

    ``refresh_cache`` is set when the job's artifact is missing, so a stale record is overwritten by a fresh
    computation rather than returned; and when the stored record is not plain JSON (:func:`stored_record_issue`),
    so that it is replaced without ever being deserialised.
    """
    refresh = not is_complete(job.uri)
    if not refresh:
        issue = stored_record_issue(task, cache_key(task.name, job))
        if issue is not None:
            _log().warning("cached result %s is not read, %s; computing it again", cache_key(task.name, job), issue)
            refresh = True
    state = task.with_options(refresh_cache=refresh)(job=job, return_state=True)
    result = state.result()
    return result, state.name == "Cached"
