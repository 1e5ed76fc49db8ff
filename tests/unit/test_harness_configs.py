"""Our task YAMLs are lm-eval's own (same Hub dataset and prompt), and the local files give lm-eval's prompts.

The Hub path is only checked as configuration (nothing is downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunecomp.evaluation import qa_prompts
from prunecomp.evaluation.harness import KNOWN_TASKS, TASKS_DIR, task_config
from prunecomp.evaluation.mmlu import MMLU_SUBJECTS, mmlu_config
from prunecomp.evaluation.qa_data import read_local

lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from tests.needs_shared import missing  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
BUILTIN = Path(lm_eval_tasks.__file__).parent
BUILTIN_YAML = {
    "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "copa": "super_glue/copa/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
}
SAME = ("task", "dataset_path", "dataset_name", "output_type", "training_split", "validation_split", "test_split",
        "target_delimiter", "fewshot_delimiter")


@pytest.fixture(scope="module")
def data() -> Path:
    if not (DATA / "README.md").is_file():
        missing(f"shared data missing: {DATA}")
    return DATA


@pytest.mark.parametrize("task", KNOWN_TASKS)
def test_hub_config_matches_lm_eval_builtin(task: str) -> None:
    ours, theirs = task_config(task), load_yaml(BUILTIN / BUILTIN_YAML[task], resolve_func=True)
    for key in SAME:
        assert ours.get(key) == theirs.get(key), key
    assert "custom_dataset" not in ours  # no data dir: lm-eval downloads dataset_path
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        if theirs.get(key) is None or isinstance(theirs[key], str | list):
            assert ours.get(key) == theirs.get(key), key
        else:  # a function: ours is a copy, compared on the real documents in the next tests
            assert callable(ours[key]) and ours[key].__name__.endswith(theirs[key].__name__), key
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]]


def test_mmlu_config_matches_lm_eval_builtin() -> None:
    assert len(MMLU_SUBJECTS) == 57
    builtin = sorted(p.stem.removeprefix("mmlu_") for p in (BUILTIN / "mmlu" / "default").glob("mmlu_*.yaml"))
    assert builtin == sorted(MMLU_SUBJECTS)
    for subject in ("anatomy", "high_school_us_history"):
        ours = mmlu_config(subject)
        theirs = load_yaml(BUILTIN / "mmlu" / "default" / f"mmlu_{subject}.yaml", resolve_func=True)
        for key in ("task", "dataset_path", "dataset_name", "description", "doc_to_text", "doc_to_choice",
                    "doc_to_target", "test_split", "fewshot_split", "fewshot_config"):
            assert ours[key] == theirs[key], key


def test_task_manager_indexes_exactly_our_tasks() -> None:
    manager = lm_eval_tasks.TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert sorted(manager.all_subtasks) == sorted(KNOWN_TASKS)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_prompt_functions_are_lm_evals(data) -> None:
    from lm_eval.tasks.hellaswag import utils as hs
    from lm_eval.tasks.super_glue.copa import utils as copa
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg

    for doc in read_local("winogrande", data)[:200]:
        assert qa_prompts.winogrande_doc_to_text(doc) == wg.doc_to_text(doc)
        assert qa_prompts.winogrande_doc_to_target(doc) == wg.doc_to_target(doc)
        assert qa_prompts.winogrande_doc_to_choice(doc) == wg.doc_to_choice(doc)
    for doc in read_local("copa", data):
        assert qa_prompts.copa_doc_to_text(doc) == copa.doc_to_text(doc)
        assert qa_prompts.copa_doc_to_choice(doc) == copa.doc_to_choice(doc)
        assert qa_prompts.copa_doc_to_target(doc) == copa.doc_to_target(doc)
    for doc in read_local("hellaswag", data)[:200]:
        assert qa_prompts.hellaswag_preprocess(doc["ctx"]) == hs.preprocess(doc["ctx"])


def test_local_docs_rebuild_the_llmfoundry_prompts(data) -> None:
    """Converting to the Hub schema loses nothing: lm-eval's prompt gives back each llm-foundry record."""
    wino = _jsonl(data / "winogrande" / "winogrande.llmfoundry.jsonl")
    for doc, rec in zip(read_local("winogrande", data), wino, strict=True):
        assert qa_prompts.winogrande_doc_to_choice(doc) == rec["context_options"]
        assert qa_prompts.winogrande_doc_to_target(doc) == rec["continuation"]
        assert qa_prompts.winogrande_doc_to_text(doc) == rec["gold"]
    copa = _jsonl(data / "copa" / "copa.llmfoundry.jsonl")
    for doc, rec in zip(read_local("copa", data), copa, strict=True):
        assert qa_prompts.copa_doc_to_text(doc) == rec["query"].replace(", because", " because").replace(
            ", therefore", " therefore")
        assert [c.strip() for c in qa_prompts.copa_doc_to_choice(doc)] == rec["choices"]
    boolq = _jsonl(data / "boolq" / "boolq.llmfoundry.jsonl")
    for doc, rec in zip(read_local("boolq", data), boolq, strict=True):
        assert f"Passage: {doc['passage']}\nQuestion: {doc['question']}?" == rec["query"]
    lambada = _jsonl(data / "lambada_openai" / "lambada_openai.llmfoundry.jsonl")
    for doc, rec in zip(read_local("lambada_openai", data), lambada, strict=True):
        words = doc["text"].split(" ")
        assert (" ".join(words[:-1]), " " + words[-1]) == (rec["context"], " " + rec["continuation"])
    import datasets

    hella = qa_prompts.hellaswag_process_docs(datasets.Dataset.from_list(read_local("hellaswag", data)[:2]))
    assert hella[0]["query"] == "Roof shingle removal: A man is sitting on a roof. he"  # ctx_b stays lower-case
    assert hella[0]["gold"] == 3 and len(hella[0]["choices"]) == 4
