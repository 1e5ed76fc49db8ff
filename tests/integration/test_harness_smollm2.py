"""The lm-eval QA scores of the real default model (SmolLM2-135M-Instruct, from its GGUF) agree with an independent
log-likelihood scorer, item by item, on a seeded 10-item subset of arc_easy.

``test_harness_stories.py`` proves the same on stories260K (a Llama with a sentencepiece tokenizer); this is the
model every command defaults to, with its GPT-2-style BPE tokenizer rebuilt from the GGUF, tied embeddings and
4-choice prompts, so a harness detail that only shows there (tokenizer copy, pad token, batching with padding
across choices of different lengths) would make the two disagree. The reference shares nothing with the harness
but lm-eval's loglikelihood convention (context and context+continuation encoded, continuation tokens scored) and
is computed one sequence at a time, unpadded; prompts are written out from the raw file. ~25 s on one CPU thread.
"""

from __future__ import annotations

import json

import pytest
import torch
from qa_reference import argmax, loglikelihood, near_tie

from prunecomp.evaluation.harness import evaluate_qa_samples, subset_indices
from prunecomp.models.sources import load_model

pytestmark = pytest.mark.integration

TASK, N_TOTAL, LIMIT, SEED, TIE = "arc_easy", 2376, 10, 1234, 1e-3


@pytest.fixture(scope="module")
def smollm2():
    """One thread, as in the stories test: the 2 shared cores are noisier than they are faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lm = load_model(None)
    assert lm.source.kind == "default" and lm.model.config.num_hidden_layers == 30
    yield lm.model.eval(), lm.tokenizer
    torch.set_num_threads(threads)


def test_arc_easy_scores_match_independent_loglikelihoods(smollm2, data_dir) -> None:
    model, tok = smollm2
    summary, samples = evaluate_qa_samples(model, tok, [TASK], data_dir=data_dir, limit=LIMIT, seed=SEED,
                                           batch_size=8)
    docs = [json.loads(line) for line in (data_dir / TASK / f"{TASK}.llmfoundry.jsonl").open(encoding="utf-8")]
    assert len(docs) == N_TOTAL
    row = summary["tasks"][TASK]
    ids = subset_indices(TASK, N_TOTAL, LIMIT, SEED)
    assert row["n"] == LIMIT and row["n_total"] == N_TOTAL and row["doc_ids"] == ids
    by_id = {s["doc_id"]: s for s in samples[TASK]}
    assert sorted(by_id) == ids

    correct, correct_norm, ties = [], [], 0
    for i in ids:
        doc = docs[i]
        pairs = [(f"{doc['query']}\nAnswer:", f" {choice}") for choice in doc["choices"]]
        assert [tuple(a) for a in by_id[i]["arguments"]] == pairs, i  # the same prompts, written independently
        lls = [loglikelihood(model, tok, c, x) for c, x in pairs]
        theirs = [r[0][0] for r in by_id[i]["resps"]]
        assert lls == pytest.approx(theirs, abs=1e-3, rel=1e-4), i
        norm = [ll / len(choice) for ll, choice in zip(lls, doc["choices"], strict=True)]
        ties += near_tie(lls, TIE)
        correct.append(argmax(lls) == doc["gold"])
        correct_norm.append(argmax(norm) == doc["gold"])
        # the same answer picked, unless two choices are too close to call
        assert near_tie(lls, TIE) or argmax(theirs) == argmax(lls), i
        assert near_tie(lls, TIE) or float(correct[-1]) == by_id[i]["acc"], i
        assert near_tie(norm, TIE) or float(correct_norm[-1]) == by_id[i]["acc_norm"], i
    assert abs(row["acc"] - sum(correct) / LIMIT) <= ties / LIMIT
    assert abs(row["acc_norm"] - sum(correct_norm) / LIMIT) <= ties / LIMIT
    assert row["metric"] == "acc_norm" and row["score"] == row["acc_norm"]  # the paper's metric for arc_easy
    assert summary["average"] == row["score"] and (summary["limit"], summary["seed"]) == (LIMIT, SEED)
