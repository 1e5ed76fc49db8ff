"""The lm-eval QA and MMLU scores of a real model (stories260K) agree with an independent log-likelihood scorer.

The reference below shares nothing with the harness but the convention it reproduces (lm-eval's loglikelihood:
context and context+continuation encoded, trailing context spaces moved to the continuation, continuation tokens
scored, left-truncated to the model's 512 positions); prompts are written out from the raw files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from qa_reference import argmax, loglikelihood, near_tie
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunecomp.evaluation.harness import (
    EvaluationError,
    evaluate_mmlu,
    evaluate_qa,
    evaluate_qa_samples,
    subset_indices,
)
from prunecomp.evaluation.mmlu import MMLU_DIR, MMLU_SUBJECTS
from tests.needs_shared import missing

pytestmark = pytest.mark.integration

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
DATA, STORIES = SHARED / "data", SHARED / "models" / "stories260K"
LIMIT, SEED, TIE = 20, 1234, 1e-3


@pytest.fixture(scope="module")
def lm():
    """One thread: on 2 shared cores torch's 2 threads made this 260K-parameter model ~60x slower (measured)."""
    if not (STORIES / "config.json").is_file() or not (DATA / "README.md").is_file():
        missing(f"real test model or data missing under {SHARED}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    yield model, AutoTokenizer.from_pretrained(STORIES)
    torch.set_num_threads(threads)


def test_qa_scores_match_independent_loglikelihoods(lm) -> None:
    model, tok = lm
    model.train()
    pad_before = tok.pad_token
    summary, samples = evaluate_qa_samples(model, tok, ["piqa", "winogrande"], data_dir=DATA, limit=LIMIT, seed=SEED)
    assert model.training and tok.pad_token == pad_before  # the caller's mode and tokenizer are left as they were
    model.eval()

    piqa_docs = [json.loads(line) for line in (DATA / "piqa" / "valid.jsonl").read_text().splitlines()]
    labels = [int(x) for x in (DATA / "piqa" / "valid-labels.lst").read_text().split()]
    wino_docs = [json.loads(line) for line in (DATA / "winogrande" / "winogrande.llmfoundry.jsonl").open()]
    requests = {  # task -> doc id -> (list of (context, continuation), choice texts for acc_norm, gold)
        "piqa": lambda i: ([(f"Question: {piqa_docs[i]['goal']}\nAnswer:", " " + s) for s in
                            (piqa_docs[i]["sol1"], piqa_docs[i]["sol2"])],
                           [piqa_docs[i]["sol1"], piqa_docs[i]["sol2"]], labels[i]),
        "winogrande": lambda i: ([(c, " " + wino_docs[i]["continuation"]) for c in wino_docs[i]["context_options"]],
                                 None, wino_docs[i]["gold"]),
    }
    for task, n_total in (("piqa", 1838), ("winogrande", 1267)):
        row = summary["tasks"][task]
        ids = subset_indices(task, n_total, LIMIT, SEED)
        assert row["n"] == LIMIT and row["n_total"] == n_total and row["doc_ids"] == ids
        by_id = {s["doc_id"]: s for s in samples[task]}
        assert sorted(by_id) == ids
        correct, correct_norm, ties = [], [], 0
        for i in ids:
            pairs, texts, gold = requests[task](i)
            lls = [loglikelihood(model, tok, c, x) for c, x in pairs]
            theirs = [r[0][0] for r in by_id[i]["resps"]]
            assert [tuple(a) for a in by_id[i]["arguments"]] == pairs  # the same prompts, written independently
            assert lls == pytest.approx(theirs, abs=1e-3, rel=1e-4)
            ties += near_tie(lls, TIE)
            correct.append(argmax(lls) == gold)
            assert near_tie(lls, TIE) or float(correct[-1]) == by_id[i]["acc"]
            if texts is not None:
                norm = [ll / len(t) for ll, t in zip(lls, texts, strict=True)]
                correct_norm.append(argmax(norm) == gold)
                assert near_tie(norm, TIE) or float(correct_norm[-1]) == by_id[i]["acc_norm"]
        assert abs(row["acc"] - sum(correct) / LIMIT) <= ties / LIMIT
        if texts is not None:
            assert abs(row["acc_norm"] - sum(correct_norm) / LIMIT) <= ties / LIMIT
    assert summary["tasks"]["piqa"]["score"] == summary["tasks"]["piqa"]["acc_norm"]  # the paper's metric
    assert summary["tasks"]["winogrande"]["acc_norm"] is None
    assert summary["average"] == pytest.approx((summary["tasks"]["piqa"]["acc_norm"] +
                                                summary["tasks"]["winogrande"]["acc"]) / 2)
    assert summary["average_metric"] == {"piqa": "acc_norm", "winogrande": "acc"}
    assert (summary["limit"], summary["seed"]) == (LIMIT, SEED)


def test_same_seed_same_items_and_scores(lm) -> None:
    model, tok = lm
    a = evaluate_qa(model, tok, ["copa", "arc_easy"], data_dir=DATA, limit=10, seed=5)
    b = evaluate_qa(model, tok, ["copa", "arc_easy"], data_dir=DATA, limit=10, seed=5)
    c = evaluate_qa(model, tok, ["copa"], data_dir=DATA, limit=10, seed=6)
    assert a == b
    assert a["tasks"]["copa"]["doc_ids"] != c["tasks"]["copa"]["doc_ids"]
    assert all(0.0 <= r["acc"] <= 1.0 and r["n"] == 10 for r in a["tasks"].values())


def test_errors_come_before_the_model_is_touched(lm, tmp_path) -> None:
    model, tok = lm
    with pytest.raises(EvaluationError, match="limit"):
        evaluate_qa(model, tok, ["copa"], data_dir=DATA, limit=0)
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "copa.llmfoundry.jsonl").write_text('{"query": "x, because", "choices": ["a", "b"]', "utf-8")
    with pytest.raises(EvaluationError, match=r"copa\.llmfoundry\.jsonl: line 1 is not valid JSON"):
        evaluate_qa(model, tok, ["copa"], data_dir=tmp_path, limit=5)


def _mmlu_rows(subject: str, split: str) -> list[list[str]]:
    with (DATA / MMLU_DIR / split / f"{subject}_{split}.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))[1:]


def _mmlu_block(row: list[str]) -> str:
    return f"{row[0].strip()}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer:"


def test_mmlu_5shot_matches_independent_scoring(lm) -> None:
    """One question per subject (57): the 5-shot prompt written out by hand, scored on " A".." D"."""
    model, tok = lm
    result = evaluate_mmlu(model, tok, data_dir=DATA, n_shot=5, limit=1, seed=SEED)
    assert result["n"] == 57 and set(result["subjects"]) == set(MMLU_SUBJECTS)
    correct, ties = 0, 0
    for subject in MMLU_SUBJECTS:
        test = _mmlu_rows(subject, "test")
        (i,) = subset_indices(f"mmlu_{subject}", len(test), 1, SEED)
        shots = "".join(f"{_mmlu_block(r)} {'ABCD'[int(r[5])]}\n\n" for r in _mmlu_rows(subject, "dev")[:5])
        context = (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
                   f"\n\n{shots}{_mmlu_block(test[i])}")
        lls = [loglikelihood(model, tok, context, f" {letter}") for letter in "ABCD"]
        ties += near_tie(lls, TIE)
        ok = argmax(lls) == int(test[i][5])
        correct += ok
        assert near_tie(lls, TIE) or result["subjects"][subject] == {"accuracy": float(ok), "n": 1}, subject
    assert abs(result["accuracy"] - correct / 57) <= ties / 57
