"""Per-candidate scoring as tasks, so one step's PPL-on-skip candidates fan out over the flow's task runner.

Each task loads the base model, replays the parent state's recipe and reads the calibration windows itself (URIs
in, a small dict out), so it runs the same in a thread, in a local Dask worker process or on a remote Dask cluster
that can read the store. It never touches the process's working copy: candidates run concurrently. The
scores do not depend on how the candidates were split, so the step's cache key ignores the split.
"""

from __future__ import annotations

import os
import socket
from typing import Any, ClassVar

from prefect import task
from pydantic import Field

from prunecomp.engine.incremental import candidate_scores
from prunecomp.models.pruning import original_indices
from tasks.caching import JOB_KEY, RESULT_SERIALIZER, json_result
from tasks.calibrate import load_windows
from tasks.jobs import StateJob
from tasks.working import load_state, recipe_of

__all__ = ["CandidateJob", "score_candidates", "split"]


class CandidateJob(StateJob):
    """Scores of some candidate layers (ORIGINAL indices) of one model state."""

    kind: ClassVar[str] = "candidates"
    not_in_key: ClassVar[frozenset[str]] = frozenset({"base_uri", "parts", "calibration_uri"})

    calibration_uri: str
    calibration_digest: str
    metric: str
    candidates: tuple[int, ...] = Field(min_length=1)
    batch_size: int = Field(gt=0)


def split(items: list[int], parts: int) -> list[tuple[int, ...]]:
    """``items`` in at most ``parts`` contiguous, nearly equal, non-empty chunks (deep layers are cheaper to skip
    from, so interleaving would balance better; contiguity keeps each worker's boundary cache short)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        out.append(tuple(items[start:end]))
        start = end
    return out


@task(name="score-candidates", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def score_candidates(job: CandidateJob) -> dict[str, Any]:
    """``{"scores": {original index: score}, "worker": host:pid}`` for the job's candidates."""
    state = load_state(job.base_uri, recipe_of(job.base_hash, job.parts, job.state_digest), device=job.device,
                       dtype=job.dtype, record=job.source_record)
    windows = load_windows(job.calibration_uri, job.calibration_digest)
    orig = original_indices(state.model)
    current = [orig.index(o) for o in job.candidates]
    scores = candidate_scores(state.model, windows.ids, job.metric, current, batch_size=job.batch_size)
    return dict(json_result({"scores": {str(orig[i]): v for i, v in scores.items()},
                             "worker": f"{socket.gethostname()}:{os.getpid()}"}))
