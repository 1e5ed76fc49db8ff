"""QA/MMLU evaluation inputs: fixed subsets, argument checks, local-file errors, and retained performance.

None of these needs a model: every check here fails (or passes) before lm-eval is given one.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest

from prunecomp.evaluation.harness import (
    DEFAULT_TASKS,
    KNOWN_TASKS,
    EvaluationError,
    evaluate_mmlu,
    evaluate_qa,
    retained,
    subset_indices,
    task_config,
)
from prunecomp.evaluation.mmlu import MMLU_DIR, read_subject
from prunecomp.evaluation.qa_data import LOCAL_SETS, read_local
from tests.needs_shared import missing

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def data() -> Path:
    if not (DATA / "README.md").is_file():
        missing(f"shared data missing: {DATA}")
    return DATA


def test_task_sets() -> None:
    assert set(DEFAULT_TASKS) <= set(KNOWN_TASKS)
    assert DEFAULT_TASKS == ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa")
    assert set(LOCAL_SETS) == set(KNOWN_TASKS)


def test_subset_is_seeded_nested_and_sorted() -> None:
    a = subset_indices("piqa", 1838, 50, seed=7)
    assert a == subset_indices("piqa", 1838, 50, seed=7)
    assert a == sorted(a) and len(set(a)) == 50 and all(0 <= i < 1838 for i in a)
    assert a != subset_indices("piqa", 1838, 50, seed=8)
    assert a != list(range(50))  # not lm-eval's "first N"
    assert set(subset_indices("piqa", 1838, 20, seed=7)) <= set(a)  # a smaller limit is a sub-subset
    assert subset_indices("copa", 100, None, seed=7) == list(range(100))
    assert subset_indices("copa", 100, 500, seed=7) == list(range(100))


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit_is_a_value_error(limit) -> None:
    with pytest.raises(EvaluationError, match="limit must be a positive integer") as info:
        evaluate_qa(None, None, ["copa"], limit=limit)
    assert isinstance(info.value, ValueError)
    with pytest.raises(EvaluationError, match="limit"):
        evaluate_mmlu(None, None, limit=limit)


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(EvaluationError, match=r"unknown task.*'mmlu_pro'.*known tasks: piqa, arc_easy"):
        evaluate_qa(None, None, ["piqa", "mmlu_pro"])
    with pytest.raises(EvaluationError, match="no tasks"):
        evaluate_qa(None, None, [])


def test_bad_n_shot() -> None:
    with pytest.raises(EvaluationError, match="n_shot must be an integer 0-5"):
        evaluate_mmlu(None, None, n_shot=6)


def test_missing_data_file_names_file_and_format(tmp_path) -> None:
    with pytest.raises(EvaluationError) as info:
        evaluate_qa(None, None, ["copa"], data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "copa" / "copa.llmfoundry.jsonl") in msg and "not found" in msg
    assert 'expected jsonl, one {query: "<premise>, because|therefore", choices: [str, str], gold: int}' in msg
    with pytest.raises(EvaluationError, match="data directory not found"):
        evaluate_qa(None, None, ["copa"], data_dir=tmp_path / "nope")
    with pytest.raises(EvaluationError, match=r"anatomy_test\.csv: data file not found; expected CSV with header"):
        read_subject(tmp_path, "anatomy")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GOOD = json.dumps({"query": "The man fell, because", "choices": ["he slipped.", "he sang."], "gold": 0})


@pytest.mark.parametrize(("second_line", "problem"), [
    ("{not json", "line 2 is not valid JSON"),
    (json.dumps({"query": "x, because", "choices": ["a", "b"]}), "line 2: field 'gold' missing or not int"),
    (json.dumps({"query": "x, because", "choices": ["a", "b"], "gold": 2}), "line 2: 'gold' 2 is not an index"),
    (json.dumps({"query": "no connector", "choices": ["a", "b"], "gold": 1}), "line 2: 'query' does not end in"),
])
def test_corrupt_jsonl_names_file_line_and_format(tmp_path, second_line: str, problem: str) -> None:
    bad = _write(tmp_path / "copa" / "copa.llmfoundry.jsonl", GOOD + "\n" + second_line + "\n")
    with pytest.raises(EvaluationError) as info:
        evaluate_qa(None, None, ["copa"], data_dir=tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: ") and problem in msg and "expected jsonl" in msg


def test_corrupt_other_formats(tmp_path) -> None:
    _write(tmp_path / "copa" / "copa.llmfoundry.jsonl", "\n")
    with pytest.raises(EvaluationError, match="file is empty"):
        read_local("copa", tmp_path)
    hs = tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2"
    _write(hs, "not bz2")
    with pytest.raises(EvaluationError, match=r"cannot read as bz2 text.*6 lines per item"):
        read_local("hellaswag", tmp_path)
    hs.write_bytes(bz2.compress(b"Label: ctx\n1\na\nb\nc\n"))
    with pytest.raises(EvaluationError, match="5 lines is not a positive multiple of 6"):
        read_local("hellaswag", tmp_path)
    _write(tmp_path / "piqa" / "valid.jsonl", json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    _write(tmp_path / "piqa" / "valid-labels.lst", "0\n1\n")
    with pytest.raises(EvaluationError, match=r"valid-labels\.lst: need 1 labels"):
        read_local("piqa", tmp_path)
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    _write(tmp_path / MMLU_DIR / "test" / "anatomy_test.csv", header + "q,a,b\n")
    _write(tmp_path / MMLU_DIR / "dev" / "anatomy_dev.csv", header)
    with pytest.raises(EvaluationError, match="row 2 malformed"):
        read_subject(tmp_path, "anatomy")


def test_local_sets_read_in_full(data) -> None:
    """Record counts are the official split sizes (data/README.md)."""
    sizes = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
             "boolq": 3270, "openbookqa": 500, "copa": 100, "lambada_openai": 5153}
    for task, n in sizes.items():
        assert len(read_local(task, data)) == n, task
    subject = read_subject(data, "anatomy")
    assert (len(subject["test"]), len(subject["dev"])) == (135, 5)


def test_local_config_uses_absolute_paths_and_drops_missing_splits(data, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # lm-eval resolves relative data paths against the CWD: ours must not be relative
    cfg = task_config("arc_easy", data)
    assert Path(cfg["dataset_path"]).is_absolute() and Path(cfg["dataset_path"]).is_file()
    assert (cfg["training_split"], cfg["validation_split"], cfg["test_split"]) == (None, None, "test")
    ds = cfg["custom_dataset"](version=1.0)
    assert list(ds) == ["test"] and len(ds["test"]) == 2376
    assert "process_docs" not in task_config("hellaswag", data)  # applied once, inside custom_dataset


def _qa(scores: dict[str, float], **extra) -> dict:
    tasks = {t: {"score": s} for t, s in scores.items()}
    return {"tasks": tasks, "average": sum(scores.values()) / len(scores), "limit": 100, "seed": 1, **extra}


def test_retained() -> None:
    dense = _qa({"piqa": 0.8, "boolq": 0.6, "copa": 0.0})
    pruned = _qa({"piqa": 0.6, "boolq": 0.6, "copa": 0.5})
    r = retained(pruned, dense)
    assert r["tasks"]["piqa"] == pytest.approx(75.0) and r["tasks"]["boolq"] == pytest.approx(100.0)
    assert r["tasks"]["copa"] is None  # dense 0: no ratio
    assert r["overall"] == pytest.approx(1.7 / 1.4 * 100)
    assert r["mean_of_ratios"] == pytest.approx(87.5)
    assert retained(_qa({"piqa": 0.4}), dense)["overall"] == pytest.approx(50.0)  # over the common tasks
    with pytest.raises(EvaluationError, match="differ in limit"):
        retained(_qa({"piqa": 0.4}, limit=50), dense)
    with pytest.raises(EvaluationError, match="share no task"):
        retained(_qa({"hellaswag": 0.4}), dense)
    mmlu_dense = {"accuracy": 0.5, "subjects": {"anatomy": {"accuracy": 0.4}}, "n_shot": 5}
    mmlu_pruned = {"accuracy": 0.25, "subjects": {"anatomy": {"accuracy": 0.3}}, "n_shot": 5}
    assert retained(mmlu_pruned, mmlu_dense) == {"subjects": {"anatomy": pytest.approx(75.0)}, "overall": 50.0}
    with pytest.raises(EvaluationError, match="two evaluate_qa results or two evaluate_mmlu"):
        retained(mmlu_pruned, dense)
