"""Top-1 agreement with the dense model's greedy next token: the counting against hand-written cases, and the
streamed helpers (reference ids computed once, pruned model compared batch by batch) independent of batching."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prunecomp.evaluation.agreement import Agreement, agreement, greedy_tokens, top1_agreement
from tests.tiny_models import tiny_model, tokens

VOCAB = 8


class MapModel(nn.Module):
    """A causal LM whose greedy next token after token ``t`` is ``mapping[t]``, whatever the batch: logits are a
    one-hot lookup per position, so the expected agreement of two such models can be counted by hand."""

    def __init__(self, mapping: list[int]) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, VOCAB)
        with torch.no_grad():
            self.table.weight.copy_(torch.nn.functional.one_hot(torch.tensor(mapping), VOCAB).float())

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table(input_ids))


IDENTITY = list(range(VOCAB))
THREE_TO_FOUR = [4 if t == 3 else t for t in range(VOCAB)]  # differs from the identity after token 3 only


def test_counts_of_a_hand_written_case() -> None:
    dense = torch.tensor([[0, 1, 2], [2, 2, 0]])
    logits = torch.zeros(2, 3, 4)
    for (i, j), tok in {(0, 0): 0, (0, 1): 1, (0, 2): 0, (1, 0): 2, (1, 1): 1, (1, 2): 0}.items():
        logits[i, j, tok] = 1.0
    assert top1_agreement(dense, logits) == (4, 6)  # positions (0, 2) and (1, 1) differ


def test_ties_go_to_the_lowest_token_id() -> None:
    assert top1_agreement(torch.tensor([1]), torch.tensor([[0.0, 2.0, 2.0]])) == (1, 1)
    assert top1_agreement(torch.tensor([2]), torch.tensor([[0.0, 2.0, 2.0]])) == (0, 1)


def test_positions_must_match() -> None:
    with pytest.raises(ValueError, match="positions differ"):
        top1_agreement(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, 5))
    model = MapModel(IDENTITY)
    with pytest.raises(ValueError, match="do not belong"):
        agreement(model, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))


def test_an_identical_model_agrees_everywhere() -> None:
    model, ids = tiny_model("llama"), tokens(5, 12)
    reference = greedy_tokens(model, ids, batch_size=2)
    assert reference.shape == (5, 11) and reference.dtype == torch.long
    got = agreement(copy.deepcopy(model), ids, reference, batch_size=2)
    assert (got.matches, got.total) == (55, 55) and got.rate == 1.0 and got.standard_error == 0.0


def test_a_known_number_of_mismatches() -> None:
    ids = torch.tensor([[1, 3, 5, 3, 2, 3], [3, 3, 0, 7, 1, 6]])
    reference = greedy_tokens(MapModel(IDENTITY), ids)
    assert torch.equal(reference, ids[:, :-1])  # the last position has no next token inside the window
    got = agreement(MapModel(THREE_TO_FOUR), ids, reference)
    threes = int((ids[:, :-1] == 3).sum())  # 4: the final 3 of the first window is not scored
    assert threes == 4 and (got.matches, got.total) == (10 - threes, 10)
    assert got.rate == pytest.approx(0.6) and got.standard_error == pytest.approx((0.6 * 0.4 / 10) ** 0.5)


def test_batching_changes_nothing() -> None:
    ids = torch.randint(0, VOCAB, (7, 9), generator=torch.Generator().manual_seed(3))
    dense, pruned = MapModel(IDENTITY), MapModel(THREE_TO_FOUR)
    references = [greedy_tokens(dense, ids, batch_size=b) for b in (1, 3, 7, 10)]
    assert all(torch.equal(r, references[0]) for r in references)
    results = {b: agreement(pruned, ids, references[0], batch_size=b) for b in (1, 2, 3, 7, 10)}
    assert len(set(results.values())) == 1
    # counts add up exactly over any split of the windows: the corpus rate is sum(matches) / sum(total)
    logits = pruned(ids).logits[:, :-1]
    parts = [top1_agreement(references[0][a:b], logits[a:b]) for a, b in ((0, 2), (2, 3), (3, 7))]
    assert (sum(m for m, _ in parts), sum(t for _, t in parts)) == top1_agreement(references[0], logits)
    assert Agreement(*top1_agreement(references[0], logits)) == results[1]


def test_agreement_adds_and_reports() -> None:
    total = Agreement(3, 4) + Agreement(1, 4)
    assert total == Agreement(4, 8) and total.to_dict() == {"matches": 4, "total": 8, "rate": 0.5}


def test_the_model_mode_is_restored() -> None:
    model = MapModel(IDENTITY).train()
    ids = torch.tensor([[1, 2, 3]])
    agreement(model, ids, greedy_tokens(model, ids))
    assert model.training
