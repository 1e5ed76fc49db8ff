"""One Prune&Comp iteration as a task: bring the working copy to the parent state, score + remove + compensate
(:func:`prunecomp.engine.loop.prune_step`, in memory or layer by layer: one loop, two backends), and write the
step's recipe part (kilobytes). Base hash + parent digest in, part URI + new digest + record out.

An uninterrupted run keeps one model in memory from step to step, with the incremental scanner's cached layer
boundaries; a resumed one loads the source once and replays the finished steps bit for bit (:mod:`tasks.working`),
then scores from a fresh pass (equal to the carried-over cache up to float rounding; bit for bit with exact
scoring).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from prunecomp.engine.loop import prune_step
from prunecomp.engine.scanners import make_scanner
from prunecomp.models.storage import is_complete
from prunecomp.recipes.recipe import RecipeStep
from tasks.caching import JOB_KEY, RESULT_SERIALIZER, json_result
from tasks.calibrate import load_windows
from tasks.jobs import StepJob
from tasks.working import checkout, read_meta, recipe_of, write_part

__all__ = ["prune_one_step"]


@task(name="prune-step", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def prune_one_step(job: StepJob) -> dict[str, Any]:
    """Remove one layer from the state ``job.parts``; the step's recipe part goes to ``job.uri``."""
    if is_complete(job.uri):
        return dict(json_result(read_meta(job.uri)))
    parent = recipe_of(job.base_hash, job.parts, job.state_digest)
    windows = load_windows(job.calibration_uri, job.calibration_digest)
    fit = None if job.fit_uri is None else load_windows(job.fit_uri, str(job.fit_digest))
    check = None if job.check_uri is None else load_windows(job.check_uri, str(job.check_digest))
    with checkout(job.base_uri, parent, stream=job.stream, device=job.device, dtype=job.dtype,
                  record=job.source_record) as wc:
        if wc.streamed is not None:
            record = prune_step(wc.streamed, windows, job.prune, step=job.step, batch_size=job.batch_size,
                                fit_windows=fit, check_windows=check)
        else:
            for_key = f"{windows.digest}:{job.batch_size}"
            scanner = wc.scanner if wc.scanner_for == for_key else make_scanner(
                wc.model, windows, job.prune, batch_size=job.batch_size)
            record = prune_step(wc.model, windows, job.prune, step=job.step, batch_size=job.batch_size,
                                scanner=scanner, scores=job.candidate_scores, fit_windows=fit,
                                check_windows=check)
            wc.scanner, wc.scanner_for = scanner, for_key  # told about this removal by prune_step
        compensated = job.prune.compensates
        part = RecipeStep(removed=record.chosen, current=record.chosen_current,
                          scale=record.applied_scale if compensated else None, gap_map=record.gap_map,
                          record=record.to_dict(), layers=record.layer_weights)
        wc.recipe = parent.plus(part)
        meta = {"uri": job.uri, "digest": wc.recipe.digest(), "parent_digest": job.state_digest, "step": job.step,
                "record": part.record, "key": job.key, "code": job.code}
        write_part(job.uri, part, meta)
    return dict(json_result(meta))
