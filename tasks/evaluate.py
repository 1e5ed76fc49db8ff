"""Evaluate one checkpoint: perplexity on the configured corpora, and optionally lm-eval QA tasks.

Results are small dicts, cached by checkpoint hash + evaluation config, and also written to
``<store>/evals/<key>/result.json`` so that they survive a fresh Prefect result storage.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from prefect import task

from prunecomp.errors import PrunecompError
from prunecomp.job import Progress, evaluate_perplexities
from prunecomp.storage import is_complete, write_dir
from tasks.caching import JOB_KEY
from tasks.files import read_json
from tasks.jobs import EvalJob
from tasks.model_io import load_checkpoint

__all__ = ["QA_MODULE", "evaluate_checkpoint", "qa_available"]

QA_MODULE = "prunecomp.evaluation.harness"
_RESULT = "result.json"


def qa_available() -> bool:
    """Whether the lm-eval QA evaluation exists in this checkout (found without importing lm-eval)."""
    try:
        return importlib.util.find_spec(QA_MODULE) is not None
    except ModuleNotFoundError:
        return False


@task(name="evaluate", cache_policy=JOB_KEY, persist_result=True)
def evaluate_checkpoint(job: EvalJob) -> dict[str, Any]:
    """``{"perplexity": {dataset: ppl}, "qa": {...} | None, "checkpoint_hash": ...}`` for ``job.checkpoint_uri``."""
    if is_complete(job.uri):
        return dict(read_json(f"{job.uri}/{_RESULT}"))
    lm = load_checkpoint(job.checkpoint_uri)
    ppl = evaluate_perplexities(lm.model, lm.tokenizer, job.evaluation, job.data_dir, Progress()) \
        if job.evaluation.datasets else {}
    qa = None
    if job.qa_tasks:
        if not qa_available():
            raise PrunecompError(f"QA evaluation needs {QA_MODULE}, which this checkout does not have")
        from prunecomp.evaluation.harness import evaluate_qa  # type: ignore[import-not-found]

        qa = evaluate_qa(lm.model, lm.tokenizer, list(job.qa_tasks), data_dir=job.data_dir, limit=job.qa_limit,
                         seed=job.seed)
    result = {"perplexity": ppl, "qa": qa, "checkpoint_hash": job.checkpoint_hash, "key": job.key}

    def fill(tmp: Path) -> None:
        (tmp / _RESULT).write_text(json.dumps(result, indent=2, default=str))

    write_dir(job.uri, fill, overwrite=True)
    return result
