"""Refinement as tasks: the dense base's predictions (the teacher, once per run, its own artifact), and the fit
that folds gains into the working copy at a pruned state (:func:`prunecomp.method.refine.refine`; kept only when they
lower the next-token NLL on held-out windows, a decision calibration artifact), whose artifact is the
gains' recipe part.

The teacher is computed on the working copy while it is still dense (the flow runs this task right after the
dense evaluation), so no second copy of the model is loaded; a resumed run whose copy is already pruned loads the
source once for it. The fit runs once after the last step (``refine_at="end"``: a refined run shares every step
with the plain run of the same parameters, the refine options are not in the step keys) or after every step
(``"each"``: the next step's parent state then includes the fit, so its key differs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from prunecomp.errors import PrunecompError
from prunecomp.method.refine import TeacherTargets, refine, teacher_targets
from prunecomp.models.redact import redact
from prunecomp.models.storage import is_complete, write_dir
from prunecomp.recipes.recipe import Recipe, RefineEdit
from tasks.caching import JOB_KEY, RESULT_SERIALIZER, json_result
from tasks.calibrate import load_windows
from tasks.files import read_bytes, read_json
from tasks.jobs import RefineJob, TeacherJob
from tasks.working import checkout, read_meta, recipe_of, write_part

__all__ = ["load_teacher", "refine_state", "teacher_predictions"]

_TARGETS = "targets.safetensors"
_META = "meta.json"


@task(name="teacher", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def teacher_predictions(job: TeacherJob) -> dict[str, Any]:
    """The base model's top-k log-probs on the refinement windows, written to ``job.uri``."""
    from safetensors.torch import save_file

    if is_complete(job.uri):
        return dict(json_result(read_json(f"{job.uri}/{_META}")))
    windows = load_windows(job.calibration_uri, job.calibration_digest)
    dense = Recipe(source={"content_hash": job.base_hash})
    with checkout(job.base_uri, dense, device=job.device, dtype=job.dtype,
                  record=job.source_record) as wc:  # the dense working copy: nothing is edited
        targets = teacher_targets(wc.model, windows.ids, topk=job.topk, batch_size=job.batch_size)
    meta = {"uri": job.uri, "key": job.key, "code": job.code, "calibration_digest": job.calibration_digest,
            "topk": job.topk, "shape": list(targets.logprobs.shape), "bytes": targets.nbytes}

    def fill(tmp: Path) -> None:
        save_file({"logprobs": targets.logprobs.contiguous(), "indices": targets.indices.contiguous()},
                  str(tmp / _TARGETS))
        (tmp / _META).write_text(json.dumps(meta, indent=2))

    write_dir(job.uri, fill, owned=True)
    return dict(json_result(meta))


def load_teacher(uri: str) -> TeacherTargets:
    """The targets a :func:`teacher_predictions` task wrote (bit for bit what it computed)."""
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(read_bytes(f"{uri.rstrip('/')}/{_TARGETS}"))
        return TeacherTargets(tensors["logprobs"], tensors["indices"])
    except (FileNotFoundError, KeyError) as exc:
        raise PrunecompError(redact(f"teacher predictions {uri!r} are missing or incomplete; delete the folder to "
                                    f"have them recomputed ({type(exc).__name__}: {exc})")) from exc


@task(name="refine", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def refine_state(job: RefineJob) -> dict[str, Any]:
    """Refine the state ``job.parts`` against the base's predictions; the gains part goes to ``job.uri``."""
    if is_complete(job.uri):
        return dict(json_result(read_meta(job.uri)))
    parent = recipe_of(job.base_hash, job.parts, job.state_digest)
    windows = load_windows(job.calibration_uri, job.calibration_digest)
    targets = load_teacher(job.teacher_uri)
    with checkout(job.base_uri, parent, device=job.device, dtype=job.dtype, record=job.source_record) as wc:
        check = None if job.check_uri is None else load_windows(job.check_uri, job.check_digest).ids
        report = refine(wc.model, windows.ids, targets, mode=job.mode, steps=job.steps, lr=job.lr,
                        batch_size=job.batch, loss=job.loss, check=check)
        wc.scanner = wc.scanner_for = None  # every layer changed: the next step scores from a fresh pass
        part = RefineEdit(gains=report.folded, report=report.to_dict())
        wc.recipe = parent.with_refine(part)
        meta = {"uri": job.uri, "digest": wc.recipe.digest(), "parent_digest": job.state_digest,
                "refine": report.to_dict(), "key": job.key, "code": job.code}
        write_part(job.uri, part, meta)
    return dict(json_result(meta))
