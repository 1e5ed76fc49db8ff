"""MMLU (57 subjects) through lm-eval: one task per subject from ``tasks/_mmlu_template.yaml``, local CSVs or Hub.

Same prompt as lm-eval's ``mmlu`` (description line, ``question / A. .. D. / Answer:``, choices `` A``..`` D``) and
its ``first_n`` few-shot sampler over the dev split, so ``n_shot=5`` is the standard 5-shot MMLU. Local data: the
pandas export of Hub ``cais/mmlu`` (header ``question,choice0,choice1,choice2,choice3,answer``, answer 0-3), one
``<subject>_test.csv`` and ``<subject>_dev.csv`` per subject, under :data:`MMLU_DIR` of the data dir.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from prunecomp.errors import EvaluationError
from prunecomp.evaluation.lm_eval_run import TASKS_DIR, check_limit, load_tasks, load_yaml, run_lm_eval, subset_indices

__all__ = ["MMLU_DIR", "MMLU_SUBJECTS", "mmlu_config", "read_subject", "run_mmlu"]

MMLU_DIR = "mmlu/cais_mmlu_export_MLILAB-FedLLM"

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)
"""The 57 subjects of ``cais/mmlu`` (its config names)."""

_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
_EXPECTED = "CSV with header question,choice0,choice1,choice2,choice3,answer and answer 0-3 (cais/mmlu export)"


def _read_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise EvaluationError(f"{path}: data file not found; expected {_EXPECTED}")
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise EvaluationError(f"{path}: cannot read ({err}); expected {_EXPECTED}") from err
    if not rows or rows[0] != _HEADER:
        raise EvaluationError(f"{path}: wrong or missing header; expected {_EXPECTED}")
    docs = []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 6 or row[5] not in ("0", "1", "2", "3"):
            raise EvaluationError(f"{path}: row {lineno} malformed; expected {_EXPECTED}")
        docs.append({"question": row[0], "subject": subject, "choices": row[1:5], "answer": int(row[5])})
    if not docs:
        raise EvaluationError(f"{path}: no questions; expected {_EXPECTED}")
    return docs


def read_subject(data_dir: str | Path, subject: str) -> dict[str, list[dict[str, Any]]]:
    """``{"test": [...], "dev": [...]}`` of one subject, in the Hub schema (question, subject, choices, answer)."""
    root = Path(data_dir).expanduser() / MMLU_DIR
    return {split: _read_csv(root / split / f"{subject}_{split}.csv", subject) for split in ("test", "dev")}


class _SubjectDataset:
    """``custom_dataset`` for one subject: lm-eval passes the task metadata, which is not needed here."""

    def __init__(self, splits: dict[str, list[dict[str, Any]]]) -> None:
        self.splits = splits

    def __call__(self, **_metadata: Any) -> Any:
        import datasets

        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in self.splits.items()})


def mmlu_config(subject: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """lm-eval config dict of ``mmlu_<subject>``: Hub ``cais/mmlu`` or, with a data dir, its CSVs (read here)."""
    if subject not in MMLU_SUBJECTS:
        raise EvaluationError(f"unknown MMLU subject {subject!r}; known: {', '.join(MMLU_SUBJECTS)}")
    cfg = load_yaml(TASKS_DIR / "_mmlu_template.yaml")
    cfg.update(task=f"mmlu_{subject}", task_alias=subject, dataset_name=subject,
               description=f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n")
    if data_dir is not None:
        cfg["dataset_path"] = str((Path(data_dir).expanduser() / MMLU_DIR).resolve())
        cfg["dataset_name"] = None
        cfg["custom_dataset"] = _SubjectDataset(read_subject(data_dir, subject))
    return cfg


def run_mmlu(model: Any, tokenizer: Any, *, data_dir: str | Path | None = None, n_shot: int = 5,
             limit: int | None = None, seed: int = 1234, batch_size: int = 8) -> dict[str, Any]:
    """See :func:`prunecomp.evaluation.harness.evaluate_mmlu` (``limit`` is per subject)."""
    check_limit(limit)
    if isinstance(n_shot, bool) or not isinstance(n_shot, int) or not 0 <= n_shot <= 5:
        raise EvaluationError(f"n_shot must be an integer 0-5 (MMLU has 5 dev questions per subject), got {n_shot!r}")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise EvaluationError(f"data directory not found: {data_dir}")
    configs = [mmlu_config(s, data_dir) for s in MMLU_SUBJECTS]
    tasks = load_tasks(configs, hub=data_dir is None)
    samples = {f"mmlu_{s}": subset_indices(f"mmlu_{s}", len(tasks[f"mmlu_{s}"].eval_docs), limit, seed)
               for s in MMLU_SUBJECTS}
    out = run_lm_eval(model, tokenizer, tasks, samples, batch_size=batch_size, num_fewshot=n_shot, seed=seed,
                       log_samples=False)
    subjects: dict[str, dict[str, Any]] = {}
    for s in MMLU_SUBJECTS:
        name = f"mmlu_{s}"
        subjects[s] = {"accuracy": float(out["results"][name]["acc,none"]),
                       "n": int(out["n-samples"][name]["effective"])}
    n = sum(r["n"] for r in subjects.values())
    return {
        "accuracy": sum(r["accuracy"] * r["n"] for r in subjects.values()) / n,
        "n": n,
        "subjects": subjects,
        "macro_accuracy": sum(r["accuracy"] for r in subjects.values()) / len(subjects),
        "n_shot": n_shot,
        "limit": limit,
        "seed": seed,
        "data": "hub" if data_dir is None else str(Path(data_dir).expanduser().resolve()),
    }
