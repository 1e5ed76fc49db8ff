"""Refinement as a task: load the dense base (the teacher) and the last pruned checkpoint, fit and fold the gains
(:func:`prunecomp.refine.refine`), save the refined checkpoint. URIs and hashes in, URI + hash + report out.

It runs once, after the last pruning step, so a refined run shares every step checkpoint with the plain
Prune&Comp run of the same parameters (the refine options are not in the step keys).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from prunecomp.checkpoint import save_pruned
from prunecomp.refine import refine, teacher_targets
from prunecomp.storage import is_complete
from tasks.caching import JOB_KEY
from tasks.calibrate import load_windows
from tasks.jobs import RefineJob
from tasks.keys import model_state_hash
from tasks.model_io import load_checkpoint, read_meta

__all__ = ["refine_checkpoint"]


@task(name="refine", cache_policy=JOB_KEY, persist_result=True)
def refine_checkpoint(job: RefineJob) -> dict[str, Any]:
    """Refine ``job.parent_uri`` against ``job.base_uri``'s predictions; the result goes to ``job.uri``."""
    if is_complete(job.uri):
        return read_meta(job.uri)
    windows = load_windows(job.calibration_uri, job.calibration_digest)
    dense = load_checkpoint(job.base_uri, job.base_hash)
    targets = teacher_targets(dense.model, windows.ids, topk=job.topk, batch_size=job.batch_size)
    del dense  # one model in memory at a time
    lm = load_checkpoint(job.parent_uri, job.parent_hash)
    report = refine(lm.model, windows.ids, targets, mode=job.mode, steps=job.steps, lr=job.lr, batch_size=job.batch)
    meta = {"uri": job.uri, "hash": model_state_hash(lm.model), "parent_hash": job.parent_hash,
            "refine": report.to_dict(), "key": job.key, "code": job.code}
    save_pruned(lm.model, lm.tokenizer, job.uri, report={"pipeline": meta}, overwrite=True)
    return meta
