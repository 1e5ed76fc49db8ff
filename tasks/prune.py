"""One Prune&Comp iteration as a task: load the parent checkpoint, score + remove + compensate
(:func:`prunecomp.loop.prune_step`), save the child checkpoint. URIs and hashes in, URI + hash + record out.

Each step reloads its parent from the store, also when the previous step ran in the same process: an
uninterrupted run and an interrupted-then-resumed one then follow exactly the same path and end in the same
tensors.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from prunecomp.checkpoint import save_pruned
from prunecomp.loop import StepRecord, prune_step
from prunecomp.storage import is_complete
from tasks.caching import JOB_KEY
from tasks.calibrate import load_windows
from tasks.jobs import StepJob
from tasks.keys import model_state_hash
from tasks.model_io import load_checkpoint, read_meta

__all__ = ["prune_one_step", "record_dict"]


def record_dict(record: StepRecord) -> dict[str, Any]:
    """A JSON-safe :class:`StepRecord` (string layer keys, non-finite scores as ``None``)."""
    return record.to_dict()


@task(name="prune-step", cache_policy=JOB_KEY, persist_result=True)
def prune_one_step(job: StepJob) -> dict[str, Any]:
    """Remove one layer from ``job.parent_uri``; the child checkpoint goes to ``job.uri``."""
    if is_complete(job.uri):
        return read_meta(job.uri)
    lm = load_checkpoint(job.parent_uri, job.parent_hash)
    windows = load_windows(job.calibration_uri, job.calibration_digest)
    record = prune_step(lm.model, windows, job.prune, step=job.step, batch_size=job.batch_size,
                        scores=job.candidate_scores)
    meta = {"uri": job.uri, "hash": model_state_hash(lm.model), "parent_hash": job.parent_hash,
            "step": job.step, "record": record_dict(record), "key": job.key, "code": job.code}
    save_pruned(lm.model, lm.tokenizer, job.uri, report={"pipeline": meta}, overwrite=True)
    return meta
