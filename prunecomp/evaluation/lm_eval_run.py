"""The lm-evaluation-harness plumbing every evaluation here shares (QA and MMLU): where the task YAMLs are, the
seeded fixed subsets, building lm-eval Task objects and running lm-eval's ``evaluate`` on an in-memory model.

A leaf: it imports nothing else from :mod:`prunecomp.evaluation`, so :mod:`~prunecomp.evaluation.harness`,
:mod:`~prunecomp.evaluation.mmlu` and :mod:`~prunecomp.evaluation.qa_data` can all use it without import loops.
lm-eval itself is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunecomp.errors import EvaluationError

if TYPE_CHECKING:
    from lm_eval.api.task import Task

__all__ = ["TASKS_DIR", "check_limit", "load_tasks", "load_yaml", "run_lm_eval", "subset_indices"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise EvaluationError(f"limit must be a positive integer or None (all items), got {limit!r}")
    return limit


def subset_indices(task: str, n_total: int, limit: int | None, seed: int) -> list[int]:
    """Indices (ascending) of the fixed ``limit``-item subset of ``task``'s ``n_total`` documents for ``seed``.

    All indices when ``limit`` is None or not smaller than ``n_total``.
    """
    check_limit(limit)
    if limit is None or limit >= n_total:
        return list(range(n_total))

    def key(i: int) -> bytes:
        return hashlib.sha256(f"{task}:{seed}:{i}".encode()).digest()

    return sorted(sorted(range(n_total), key=key)[:limit])


def load_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as a dict, ``!function a.b.f`` imported as ``a.b.f`` (what lm-eval does for importable names)."""
    import importlib

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def _function(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        module, _, name = str(loader.construct_scalar(node)).rpartition(".")  # type: ignore[arg-type]
        return getattr(importlib.import_module(module), name)

    _Loader.add_constructor("!function", _function)
    with path.open(encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_Loader)  # a SafeLoader plus the one constructor


def _drop_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """lm-eval warns, per task with a ``custom_dataset``, about a CLI flag that does not apply here (57x for MMLU)."""
    return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def load_tasks(specs: Sequence[str | dict[str, Any]], *, hub: bool) -> dict[str, Task]:
    """Build lm-eval Task objects (this loads the data) through a TaskManager that indexes only ``tasks/``."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(_drop_custom_dataset_hint)
    try:
        return dict(manager.load(list(specs))["tasks"])
    except Exception as err:
        if not hub:
            raise
        raise EvaluationError(f"could not load the Hub datasets for {', '.join(map(str, specs))} ({err}); "
                              "pass a data dir (--data-dir / PRUNECOMP_DATA_DIR) to use local copies") from err
    finally:
        task_logger.removeFilter(_drop_custom_dataset_hint)


def run_lm_eval(model: Any, tokenizer: Any, tasks: Mapping[str, Task], samples: dict[str, list[int]], *,
                 batch_size: int, num_fewshot: int, seed: int, log_samples: bool) -> dict[str, Any]:
    """lm-eval's ``evaluate`` on already-built tasks and the given doc indices; the model's train/eval mode is kept.

    ``evaluate`` rather than ``simple_evaluate``: the latter also reseeds the global RNGs and records the git hash
    and environment, none of which we want from a library call. HFLM gets a copy of the tokenizer because it sets a
    pad token on it; it does call ``model.eval()`` and ``model.tie_weights()`` on the model itself.
    """
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    for task in tasks.values():
        task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=seed)
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        out = evaluate(lm=lm, task_dict={"tasks": dict(tasks), "groups": {}, "group_map": {}}, samples=samples,
                       bootstrap_iters=0, log_samples=log_samples)
    finally:
        model.train(was_training)
    if out is None:  # only on non-zero ranks of a distributed run, which this in-process call never is
        raise EvaluationError("lm-eval returned no results")
    return out
