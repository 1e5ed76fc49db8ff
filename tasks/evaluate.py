"""Evaluate one checkpoint: perplexity on the configured corpora, and optionally lm-eval QA tasks.

Results are small dicts, cached by checkpoint hash + evaluation config + the content of the data files read, and
also written to ``<store>/evals/<key>/result.json`` so that they survive a fresh Prefect result storage. The data
files are checked against what the job was keyed with before and after the evaluation reads them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from prefect import task

from prunecomp.engine.job import Progress, evaluate_perplexities
from prunecomp.errors import PrunecompError
from prunecomp.models.storage import is_complete, write_dir
from tasks.caching import JOB_KEY, RESULT_SERIALIZER, json_result
from tasks.files import read_json
from tasks.jobs import EvalJob, eval_files
from tasks.keys import check_files, check_source
from tasks.model_io import load_verified
from tasks.working import checkout, recipe_of

__all__ = ["QA_MODULE", "evaluate_checkpoint", "qa_available"]

QA_MODULE = "prunecomp.evaluation.harness"
_RESULT = "result.json"


def qa_available() -> bool:
    """Whether the lm-eval QA evaluation exists in this checkout (found without importing lm-eval)."""
    try:
        return importlib.util.find_spec(QA_MODULE) is not None
    except ModuleNotFoundError:
        return False


def _evaluate(job: EvalJob, model: Any, tokenizer: Any, streamed: Any) -> tuple[dict[str, float], Any]:
    if streamed is not None:
        from prunecomp.corpora.calibration import evaluation_windows

        if job.qa_tasks:
            raise PrunecompError("QA tasks need the whole model in memory; they cannot run on a layer-streamed "
                                 "model (drop qa_tasks, or run without stream_layers)")
        ev = job.evaluation
        return {name: streamed.perplexity(evaluation_windows(tokenizer, name, seq_len=ev.seq_len,
                                                             max_windows=ev.max_windows, data_dir=job.data_dir).ids,
                                          batch_size=ev.batch_size)
                for name in ev.datasets}, None
    ppl = evaluate_perplexities(model, tokenizer, job.evaluation, job.data_dir, Progress()) \
        if job.evaluation.datasets else {}
    qa = None
    if job.qa_tasks:
        if not qa_available():
            raise PrunecompError(f"QA evaluation needs {QA_MODULE}, which this checkout does not have")
        from prunecomp.evaluation.harness import evaluate_qa  # type: ignore[import-not-found]

        qa = evaluate_qa(model, tokenizer, list(job.qa_tasks), data_dir=job.data_dir, limit=job.qa_limit,
                         seed=job.seed)
    return ppl, qa


def _final_check(job: EvalJob, wc: Any, recipe: Any) -> dict[str, Any] | None:
    """Held-out calibration loss of the state with and without what its recipe folded."""
    from functools import partial

    from prunecomp.engine.final_check import run_final_check

    assert job.final_check is not None
    cal = job.final_check
    done = run_final_check(wc.streamed if wc.streamed is not None else wc.model, wc.tokenizer, recipe, cal,
                           job.data_dir, originals=partial(_base_layers, job, wc.model))
    return None if done is None else done.to_dict()


def _base_layers(job: EvalJob, model: Any, layers: dict[int, int]) -> dict[int, dict[str, Any]]:
    """The base checkpoint's weights of the layers block reconstruction rewrote (pruned index -> original), read
    again from the source: checked against the job's record of it first."""
    from prunecomp.engine.dense import folder_layer_weights
    from prunecomp.models.adapters import get_adapter
    from prunecomp.models.sources import resolve_source

    assert job.base_uri is not None and job.base_hash is not None
    if job.source_record is not None:
        check_source(job.source_record, job.base_hash)
    return folder_layer_weights(resolve_source(job.base_uri).local_dir, get_adapter(model).layers, layers)


@task(name="evaluate", cache_policy=JOB_KEY, persist_result=True, result_serializer=RESULT_SERIALIZER)
def evaluate_checkpoint(job: EvalJob) -> dict[str, Any]:
    """``{"perplexity": {dataset: ppl}, "qa": {...} | None, "checkpoint_hash": ...}`` of the job's model."""
    if is_complete(job.uri):
        return dict(json_result(read_json(f"{job.uri}/{_RESULT}")))
    files = eval_files(job.evaluation, job.data_dir, job.qa_tasks, job.final_check)
    check_files(job.data_files, files)
    check = None
    if job.base_uri is not None:  # a pipeline state: evaluated on the working copy, no checkpoint needed
        assert job.base_hash is not None
        recipe = recipe_of(job.base_hash, job.parts, job.checkpoint_hash)
        with checkout(job.base_uri, recipe, stream=job.stream, device=job.device, dtype=job.dtype,
                      record=job.source_record) as wc:
            ppl, qa = _evaluate(job, wc.model, wc.tokenizer, wc.streamed)
            if job.final_check is not None and recipe.steps:
                check = _final_check(job, wc, recipe)
    else:
        if job.checkpoint_uri is None:
            raise PrunecompError("an evaluation needs a checkpoint URI or a base model and recipe parts")
        lm = load_verified(job.checkpoint_uri, job.checkpoint_hash, device=job.device, dtype=job.dtype)
        ppl, qa = _evaluate(job, lm.model, lm.tokenizer, None)
    check_files(job.data_files, files)  # and not rewritten while they were read
    result = json_result({"perplexity": ppl, "qa": qa, "checkpoint_hash": job.checkpoint_hash, "key": job.key,
                          "final_check": check})

    def fill(tmp: Path) -> None:
        (tmp / _RESULT).write_text(json.dumps(result, indent=2, default=str))

    write_dir(job.uri, fill, owned=True)
    return dict(result)
