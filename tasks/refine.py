"""Refinement as a task: the dense base's predictions (teacher, loaded on its own and freed), then fit and fold
the gains into the working copy at the last pruned state (:func:`prunecomp.refine.refine`); the artifact is the
gains' recipe part.

It runs once, after the last pruning step, so a refined run shares every step with the plain Prune&Comp run of
the same parameters (the refine options are not in the step keys).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from prunecomp.recipe import RefineEdit
from prunecomp.refine import refine, teacher_targets
from prunecomp.sources import load_model
from prunecomp.storage import is_complete
from tasks.caching import JOB_KEY
from tasks.calibrate import load_windows
from tasks.jobs import RefineJob
from tasks.working import checkout, read_meta, recipe_of, write_part

__all__ = ["refine_state"]


@task(name="refine", cache_policy=JOB_KEY, persist_result=True)
def refine_state(job: RefineJob) -> dict[str, Any]:
    """Refine the state ``job.parts`` against the base's predictions; the gains part goes to ``job.uri``."""
    if is_complete(job.uri):
        return read_meta(job.uri)
    parent = recipe_of(job.base_hash, job.parts, job.state_digest)
    windows = load_windows(job.calibration_uri, job.calibration_digest)
    dense = load_model(job.base_uri, known_hash=job.base_hash)
    targets = teacher_targets(dense.model, windows.ids, topk=job.topk, batch_size=job.batch_size)
    del dense  # one model in memory besides the working copy, and only while the targets are computed
    with checkout(job.base_uri, parent) as wc:
        report = refine(wc.model, windows.ids, targets, mode=job.mode, steps=job.steps, lr=job.lr,
                        batch_size=job.batch)
        wc.scanner = wc.scanner_for = None
        part = RefineEdit(gains=report.folded, report=report.to_dict())
        wc.recipe = parent.with_refine(part)
        meta = {"uri": job.uri, "digest": wc.recipe.digest(), "parent_digest": job.state_digest,
                "refine": report.to_dict(), "key": job.key, "code": job.code}
        write_part(job.uri, part, meta)
    return meta
