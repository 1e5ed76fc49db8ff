"""The sequential refit as a task (:func:`prunecomp.method.refit.sequential_refit`): after the last step and before the
end refinement, every layer after the first gap of the working copy is refitted to the base model's streams; the
artifact is a layers part (:class:`prunecomp.recipes.recipe.LayerEdit`, the refitted layers' parameters).

The dense streams come from the base checkpoint (always a safetensors folder in the store), read one layer at a
time beside the working copy (:class:`prunecomp.engine.streamed.StreamedModel`), so the task holds one extra layer, not
a second model. Its own task, like refinement: a refitted run shares every step with the plain run of the same
parameters (the refit options are not in the step keys).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from prunecomp.engine.dense import dense_from_folder
from prunecomp.method.refit import sequential_refit
from prunecomp.models.storage import is_complete
from prunecomp.recipes.recipe import LayerEdit
from tasks.caching import JOB_KEY, RESULT_SERIALIZER, json_result
from tasks.calibrate import load_windows
from tasks.jobs import RefitJob
from tasks.keys import check_source
from tasks.working import checkout, read_meta, recipe_of, write_part

__all__ = ["refit_state"]


@task(name="refit", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def refit_state(job: RefitJob) -> dict[str, Any]:
    """Refit the state ``job.parts`` to the base's streams; the layers part goes to ``job.uri``."""
    from prunecomp.models.sources import resolve_source

    if is_complete(job.uri):
        return dict(json_result(read_meta(job.uri)))
    parent = recipe_of(job.base_hash, job.parts, job.state_digest)
    windows = load_windows(job.calibration_uri, job.calibration_digest)
    with checkout(job.base_uri, parent, device=job.device, dtype=job.dtype, record=job.source_record) as wc:
        if job.source_record is not None:  # its layers are read again, one at a time: still the hashed files?
            check_source(job.source_record, job.base_hash)
        dense = dense_from_folder(resolve_source(job.base_uri).local_dir, wc.model)
        report, weights = sequential_refit(wc.model, windows.ids, dense, steps=job.steps, lr=job.lr,
                                           batch_size=job.batch)
        wc.scanner = wc.scanner_for = None  # layers changed: nothing scores this state again, but never stale
        part = LayerEdit(layers=weights, report=report.to_dict())
        wc.recipe = parent.with_layers(part)
        meta = {"uri": job.uri, "digest": wc.recipe.digest(), "parent_digest": job.state_digest,
                "refit": report.to_dict(), "key": job.key, "code": job.code}
        write_part(job.uri, part, meta)
    return dict(json_result(meta))
