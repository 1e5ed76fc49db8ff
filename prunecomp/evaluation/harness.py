"""Zero-shot QA and 5-shot MMLU accuracy of an in-memory model, through lm-evaluation-harness, on local or Hub data.

Why lm-eval rather than our own scorer: the paper's numbers (and everyone else's) come from it, so scoring, prompt
and tokenization conventions (context/continuation split, ``acc_norm`` by characters) must be exactly its own. The
model is evaluated as the object in memory (``HFLM(pretrained=model, tokenizer=...)``), never re-loaded.

Tasks are lm-eval task YAMLs shipped in ``tasks/`` (copies of lm-eval 0.4.13's own, same Hub ``dataset_path``):

* ``data_dir=None``: lm-eval downloads each task's standard Hub dataset (``baber/piqa``, ``allenai/ai2_arc``,
  ``Rowan/hellaswag``, ``allenai/winogrande``, ``aps/super_glue`` (boolq, copa), ``allenai/openbookqa``,
  ``EleutherAI/lambada_openai``, ``cais/mmlu``): the path for users with internet access.
* ``data_dir`` given (laid out like ``../shared/data``, see its README): the same configs read the local files,
  converted in memory to the Hub schema by :mod:`prunecomp.evaluation.qa_data` (absolute paths, no temp files, so
  the current directory does not matter). Only difference known: HellaSwag's local text keeps ``ctx_b``
  lower-case.

Scores: ``acc`` and, where lm-eval defines it, ``acc_norm``. The average follows the paper: ``acc_norm`` for
arc_easy, arc_challenge, hellaswag and piqa, ``acc`` for the others (:data:`AVERAGE_METRIC`, also written into every
result as ``"average_metric"``).

``limit`` evaluates a fixed subset: per task, the ``limit`` documents with the smallest
``sha256("<task>:<seed>:<index>")``, so every model sees the same items for the same seed, the choice does not
depend on library versions, and a smaller limit's subset is contained in a larger one's (lm-eval's own ``limit``
takes the first N, which for sorted files is a biased sample).

lm-eval, datasets and transformers are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunecomp.errors import EvaluationError
from prunecomp.evaluation import qa_data
from prunecomp.evaluation.lm_eval_run import (
    TASKS_DIR,
    check_limit,
    load_tasks,
    load_yaml,
    run_lm_eval,
    subset_indices,
)
from prunecomp.evaluation.mmlu import run_mmlu

if TYPE_CHECKING:
    pass

__all__ = [
    "AVERAGE_METRIC",
    "DEFAULT_TASKS",
    "KNOWN_TASKS",
    "TASKS_DIR",
    "EvaluationError",
    "check_tasks",
    "evaluate_mmlu",
    "evaluate_qa",
    "evaluate_qa_samples",
    "retained",
    "subset_indices",
    "task_config",
]

KNOWN_TASKS: tuple[str, ...] = (
    "piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa", "copa", "lambada_openai",
)
"""Every QA task with a config in ``tasks/`` (MMLU is separate: :func:`evaluate_mmlu`)."""

DEFAULT_TASKS: tuple[str, ...] = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")
"""The paper's 7-task zero-shot set."""

AVERAGE_METRIC: dict[str, str] = {
    task: "acc_norm" if task in ("arc_easy", "arc_challenge", "hellaswag", "piqa") else "acc" for task in KNOWN_TASKS
}
"""The metric each task contributes to the average (the paper's choice)."""

def check_tasks(tasks: Sequence[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
    if not names:
        raise EvaluationError(f"no tasks given; known tasks: {', '.join(KNOWN_TASKS)}")
    unknown = [t for t in names if t not in KNOWN_TASKS]
    if unknown:
        raise EvaluationError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(KNOWN_TASKS)}")
    return names


def task_config(task: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """The lm-eval config dict of ``task``: its YAML, or with a data dir, the YAML reading the local files.

    With a data dir the files are read and checked here (errors name the file and the expected format) and the
    config gets a ``custom_dataset`` returning them; the splits lm-eval would otherwise look for and that the local
    copy lacks (train, the other eval split) are set to None. Without one nothing is downloaded until lm-eval builds
    the task.
    """
    (task,) = check_tasks([task])
    cfg = load_yaml(TASKS_DIR / f"{task}.yaml")
    if data_dir is None:
        return cfg
    source = qa_data.LOCAL_SETS[task]
    docs = qa_data.read_local(task, data_dir)
    for key in ("training_split", "validation_split", "test_split"):
        if cfg.get(key) not in (None, source.split):
            cfg[key] = None
    cfg["dataset_path"] = str((Path(data_dir).expanduser() / source.path).resolve())
    cfg["dataset_name"] = None
    cfg["custom_dataset"] = _LocalDataset(source.split, docs, cfg.pop("process_docs", None))
    return cfg


class _LocalDataset:
    """``custom_dataset`` callable: lm-eval calls it with the task metadata, which the local copy does not need.

    It also applies the task's ``process_docs`` once: lm-eval re-applies it on every access to the eval docs (8
    times per run, about 1 s each for HellaSwag's 10k items).
    """

    def __init__(self, split: str, docs: list[dict[str, Any]], process_docs: Callable[[Any], Any] | None) -> None:
        self.split, self.docs, self.process_docs = split, docs, process_docs

    def __call__(self, **_metadata: Any) -> Any:
        import datasets

        ds = datasets.Dataset.from_list(self.docs)
        if self.process_docs is not None:
            ds = self.process_docs(ds)
        return datasets.DatasetDict({self.split: ds})


def _qa(model: Any, tokenizer: Any, tasks: Sequence[str], *, data_dir: str | Path | None, limit: int | None,
        seed: int, batch_size: int, log_samples: bool) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    names = check_tasks(tasks)
    check_limit(limit)
    specs = [task_config(t, data_dir) for t in names] if data_dir is not None else names
    built = load_tasks(specs, hub=data_dir is None)
    n_total = {name: len(built[name].eval_docs) for name in names}
    samples = {name: subset_indices(name, n_total[name], limit, seed) for name in names}
    out = run_lm_eval(model, tokenizer, {n: built[n] for n in names}, samples, batch_size=batch_size,
                       num_fewshot=0, seed=seed, log_samples=log_samples)
    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        res = out["results"][name]
        metric = AVERAGE_METRIC[name]
        row: dict[str, Any] = {
            "acc": float(res["acc,none"]),
            "acc_norm": float(res["acc_norm,none"]) if "acc_norm,none" in res else None,
            "n": int(out["n-samples"][name]["effective"]),
            "n_total": n_total[name],
            "metric": metric,
            "score": float(res[f"{metric},none"]),
        }
        if "perplexity,none" in res:
            row["perplexity"] = float(res["perplexity,none"])
        if row["n"] < n_total[name]:
            row["doc_ids"] = samples[name]
        per_task[name] = row
    summary = {
        "tasks": per_task,
        "average": sum(r["score"] for r in per_task.values()) / len(per_task),
        "average_metric": {name: AVERAGE_METRIC[name] for name in names},
        "limit": limit,
        "seed": seed,
        "num_fewshot": 0,
        "data": "hub" if data_dir is None else str(Path(data_dir).expanduser().resolve()),
    }
    return summary, dict(out.get("samples") or {})


def evaluate_qa(model: Any, tokenizer: Any, tasks: Sequence[str] = DEFAULT_TASKS, *,
                data_dir: str | Path | None = None, limit: int | None = None, seed: int = 1234,
                batch_size: int = 8) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` with lm-eval, plus the paper's average.

    Args:
        model: a causal LM already in memory (``transformers`` model); evaluated where it is, mode restored after.
        tokenizer: its tokenizer (not modified).
        tasks: names from :data:`KNOWN_TASKS`; default the paper's 7 (:data:`DEFAULT_TASKS`).
        data_dir: folder laid out like ``../shared/data``; None downloads the Hub datasets.
        limit: evaluate a fixed seeded subset of at most ``limit`` items per task (see the module doc); None = all.
        seed: picks the subset (and lm-eval's few-shot seed, unused at 0 shots).
        batch_size: lm-eval's batch size.

    Returns:
        ``{"tasks": {name: {"acc", "acc_norm" (None where lm-eval has none), "n" (items scored), "n_total",
        "metric" (the one averaged), "score" (its value), ["perplexity" for lambada], ["doc_ids" when a subset]}},
        "average": mean of the scores, "average_metric": {name: metric}, "limit", "seed", "num_fewshot", "data"}``.

    Raises:
        EvaluationError: unknown task, ``limit <= 0``, missing/corrupt data file, or Hub data unreachable.
    """
    summary, _ = _qa(model, tokenizer, tasks, data_dir=data_dir, limit=limit, seed=seed, batch_size=batch_size,
                     log_samples=False)
    return summary


def evaluate_qa_samples(model: Any, tokenizer: Any, tasks: Sequence[str] = DEFAULT_TASKS, *,
                        data_dir: str | Path | None = None, limit: int | None = None, seed: int = 1234,
                        batch_size: int = 8) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """:func:`evaluate_qa`'s summary plus lm-eval's per-item records, to audit a score item by item.

    Each record has ``doc_id``, ``doc``, ``arguments`` (the (context, continuation) pairs scored), ``resps``
    (``[[(loglikelihood, is_greedy)], ...]``, one per choice) and the per-item metrics (``acc``, ``acc_norm``).
    """
    return _qa(model, tokenizer, tasks, data_dir=data_dir, limit=limit, seed=seed, batch_size=batch_size,
               log_samples=True)


def evaluate_mmlu(model: Any, tokenizer: Any, *, data_dir: str | Path | None = None, n_shot: int = 5,
                  limit: int | None = None, seed: int = 1234) -> dict[str, Any]:
    """MMLU accuracy (lm-eval's ``mmlu`` prompt, ``n_shot`` first dev examples), micro-averaged and per subject.

    One lm-eval task per subject (57), built from ``tasks/_mmlu_template.yaml``; locally from the cais CSV export
    ``<data_dir>/mmlu/cais_mmlu_export_MLILAB-FedLLM/{dev,test}/<subject>_{dev,test}.csv``, else Hub ``cais/mmlu``.
    ``limit`` applies per subject (the same seeded subset rule as :func:`evaluate_qa`), so ``limit=k`` scores at
    most ``57 * k`` questions.

    Returns:
        ``{"accuracy": correct / questions over all subjects, "n": questions, "subjects": {subject: {"accuracy",
        "n"}}, "macro_accuracy": mean over subjects, "n_shot", "limit", "seed", "data"}``.
    """
    return run_mmlu(model, tokenizer, data_dir=data_dir, n_shot=n_shot, limit=limit, seed=seed)


def _ratio(pruned: float | None, dense: float | None) -> float | None:
    if pruned is None or dense is None or dense == 0:
        return None
    return pruned / dense * 100.0


def retained(pruned: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """Retained performance, ``pruned / dense * 100``, per task and overall, of two results of the same evaluation.

    For :func:`evaluate_qa` results: ``{"tasks": {name: %}, "overall": % of the averages over the common tasks,
    "mean_of_ratios": mean of the per-task %}``. For :func:`evaluate_mmlu` results: ``{"subjects": {name: %},
    "overall": % of the micro accuracies}``. A task whose dense score is 0 gets None. Results computed on different
    subsets (``limit``/``seed``) are refused: their ratio would compare different questions.
    """
    for key in ("limit", "seed", "n_shot"):
        if key in pruned and key in dense and pruned[key] != dense[key]:
            raise EvaluationError(f"results differ in {key} ({pruned[key]!r} vs {dense[key]!r}); not comparable")
    if "tasks" in pruned and "tasks" in dense:
        common = [t for t in dense["tasks"] if t in pruned["tasks"]]
        if not common:
            raise EvaluationError("the two results share no task")
        per = {t: _ratio(pruned["tasks"][t]["score"], dense["tasks"][t]["score"]) for t in common}
        ratios = [r for r in per.values() if r is not None]

        def mean(result: dict[str, Any]) -> float:
            return sum(result["tasks"][t]["score"] for t in common) / len(common)

        return {"tasks": per, "overall": _ratio(mean(pruned), mean(dense)),
                "mean_of_ratios": sum(ratios) / len(ratios) if ratios else None}
    if "accuracy" in pruned and "accuracy" in dense:
        subjects = {s: _ratio(pruned["subjects"][s]["accuracy"], d["accuracy"])
                    for s, d in dense.get("subjects", {}).items() if s in pruned.get("subjects", {})}
        return {"subjects": subjects, "overall": _ratio(pruned["accuracy"], dense["accuracy"])}
    raise EvaluationError("retained() needs two evaluate_qa results or two evaluate_mmlu results")
