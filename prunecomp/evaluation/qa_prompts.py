"""Prompt functions referenced by the task YAMLs in ``tasks/`` (``!function prunecomp.evaluation.qa_prompts.*``).

They are copies of lm-evaluation-harness 0.4.13's own helpers (MIT licence: ``lm_eval/tasks/hellaswag/utils.py``,
``winogrande/preprocess_winogrande.py``, ``super_glue/copa/utils.py``), kept here so the prompts do not depend on
where a given lm-eval release keeps its task modules. Being the same code is what makes a local run comparable with
a published lm-eval number; ``tests/unit/test_harness_configs.py`` checks they still agree with the installed lm-eval.
They read the schema of the Hugging Face Hub datasets, which ``qa_data`` rebuilds from the local files.
"""

from __future__ import annotations

import re
from typing import Any

import datasets

__all__ = [
    "copa_doc_to_choice",
    "copa_doc_to_target",
    "copa_doc_to_text",
    "hellaswag_preprocess",
    "hellaswag_process_docs",
    "winogrande_doc_to_choice",
    "winogrande_doc_to_target",
    "winogrande_doc_to_text",
]


def hellaswag_preprocess(text: str) -> str:
    """Drop WikiHow's ``[title]``/``[step]`` markers and double spaces, as lm-eval does."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """``{query, choices, gold}`` from the Hub schema, with lm-eval's ``ctx_a + " " + ctx_b.capitalize()``."""

    def _process_doc(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """Index of the gold context: WinoGrande scores one shared continuation after each of two contexts."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The part of the sentence after the blank (the continuation that is scored)."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, filled with each option (the contexts)."""
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _copa_lower_first(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc: dict[str, Any]) -> str:
    """Premise without its final period, then ``because`` (cause) or ``therefore`` (effect)."""
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"


def copa_doc_to_target(doc: dict[str, Any]) -> str:
    """The correct alternative, lower-cased first letter, with lm-eval's leading space."""
    return " " + _copa_lower_first(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def copa_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """Both alternatives as lm-eval writes them (a leading space on top of the target delimiter: lm-eval's quirk)."""
    return [" " + _copa_lower_first(doc["choice1"]), " " + _copa_lower_first(doc["choice2"])]
