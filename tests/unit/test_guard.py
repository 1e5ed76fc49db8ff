"""Guarded compensation: the grid, the choice, the exactness of the cheap tail measurement, and the decisions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prunecomp.compensation import compensate
from prunecomp.config import PruneConfig
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.guard import candidate_scales, guard_cell, guard_in_memory, guard_line, pick
from prunecomp.incremental import IncrementalScanner
from prunecomp.loop import prune_and_compensate
from prunecomp.pruning import remove_layer
from prunecomp.scoring import scan_layers
from tests.tiny_models import FAMILIES, tiny_model, tokens


def test_candidate_scales_hit_none_and_paper_exactly() -> None:
    s = 1.2345678901234
    assert candidate_scales(s, (0.0, 0.5, 1.0, 1.25)) == [1.0, s ** 0.5, s, s ** 1.25]


def test_pick_lowest_loss_ties_to_the_paper() -> None:
    assert pick([0.0, 0.5, 1.0], [3.0, 2.0, 2.5]) == 1
    assert pick([0.0, 0.5, 1.0], [2.0, 2.0, 2.0]) == 2  # a tie keeps the paper's scale
    assert pick([0.0, 1.0, 1.25], [1.0, 2.0, 3.0]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_tail_losses_equal_the_folded_models_loss(family: str) -> None:
    """The guard's cheap measurement (only the layers after the gap, from the stream at the gap) is the calibration
    NLL of the model really pruned and compensated by each candidate scale."""
    model = tiny_model(family)
    ids = tokens(4, 12)
    current = 2
    s = scan_layers(model, ids, "bi", batch_size=2).scales[current]
    result = guard_in_memory(model, ids, current, s, (0.0, 0.5, 1.0, 1.25), batch_size=2)
    for c, loss in zip(result.scales, result.losses, strict=True):
        pruned = copy.deepcopy(model)
        remove_layer(pruned, current)
        compensate(pruned, current, c)
        assert loss == pytest.approx(mean_nll(pruned, ids, batch_size=2), rel=1e-5)


def test_cached_gap_stream_gives_the_same_measurement() -> None:
    model = tiny_model("llama")
    ids = tokens(4, 12)
    scanner = IncrementalScanner(model, ids, batch_size=2)
    scan = scanner.scan("bi")
    fresh = guard_in_memory(model, ids, 3, scan.scales[3], (0.0, 1.0), batch_size=2)
    cached = guard_in_memory(model, ids, 3, scan.scales[3], (0.0, 1.0), batch_size=2, cached=scanner.boundary(3))
    assert cached.losses == pytest.approx(fresh.losses, rel=1e-6)
    scanner.removed(3, 1.0)
    assert scanner.boundary(3) is None  # stale after a removal until the next scan


def _hurting_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """A model where the paper's compensation provably hurts: layer 2 multiplies the stream's magnitude by ~30
    (so s is large), and scaling the stream by s drowns out everything the later layers add, which the model
    needs: with s folded the calibration loss is far worse than with the layer simply removed."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        layer = model.model.layers[2]
        layer.mlp.down_proj.weight.mul_(40.0)
        layer.self_attn.o_proj.weight.mul_(40.0)
    return model, tokens(4, 16, seed=5)


def test_guard_declines_compensation_that_hurts() -> None:
    model, ids = _hurting_model()
    paper = copy.deepcopy(model)
    naive = copy.deepcopy(model)
    guarded = copy.deepcopy(model)
    cfg = dict(n_layers=1, protect=(0, 1, 3, 4, 5))  # layer 2 is the only candidate
    rep_paper = prune_and_compensate(paper, ids, PruneConfig(**cfg, compensation="magnitude"), batch_size=2)
    prune_and_compensate(naive, ids, PruneConfig(**cfg, compensation="none"), batch_size=2)
    rep = prune_and_compensate(guarded, ids, PruneConfig(**cfg), batch_size=2)  # guarded is the default
    assert rep_paper.steps[0].measured_scale > 5.0
    paper_loss, naive_loss = mean_nll(paper, ids, batch_size=2), mean_nll(naive, ids, batch_size=2)
    assert paper_loss > naive_loss + 0.1  # the case: compensation hurts
    step = rep.steps[0]
    assert step.guard is not None and step.guard["decision"] in ("declined", "adjusted")
    assert step.guard["losses"][step.guard["scales"].index(step.applied_scale)] <= naive_loss + 1e-6
    assert mean_nll(guarded, ids, batch_size=2) <= naive_loss + 1e-6
    assert step.guard["paper_loss"] == pytest.approx(paper_loss, rel=1e-5)
    assert step.guard["uncompensated_loss"] == pytest.approx(naive_loss, rel=1e-5)
    assert "declined" in guard_line(step.guard) or "adjusted" in guard_line(step.guard)
    assert guard_cell(step.guard) == step.guard["decision"]


def test_guard_decision_declined_is_bit_identical_to_no_compensation() -> None:
    model, ids = _hurting_model()
    naive, guarded = copy.deepcopy(model), copy.deepcopy(model)
    cfg = dict(n_layers=1, protect=(0, 1, 3, 4, 5))
    prune_and_compensate(naive, ids, PruneConfig(**cfg, compensation="none"), batch_size=2)
    rep = prune_and_compensate(guarded, ids, PruneConfig(**cfg, guard_exponents=(0.0, 1.0)), batch_size=2)
    assert rep.steps[0].guard["decision"] == "declined" and rep.steps[0].applied_scale == 1.0
    for (name, a), b in zip(naive.state_dict().items(), guarded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_paper_mode_is_the_paper_bit_for_bit(family: str) -> None:
    """``compensation="magnitude"`` equals a hand-written paper loop (score, remove, fold s, re-score) exactly."""
    model = tiny_model(family)
    ids = tokens(4, 12)
    ours = copy.deepcopy(model)
    rep = prune_and_compensate(ours, ids, PruneConfig(n_layers=2, compensation="magnitude", scoring="exact"),
                               batch_size=2)
    ref = copy.deepcopy(model)
    for _ in range(2):
        scan = scan_layers(ref, ids, "bi", batch_size=2)
        cands = range(len(ref.model.layers) - 1)  # BI protects the last layer
        i = min(cands, key=lambda j: (scan.scores[j], j))
        remove_layer(ref, i)
        compensate(ref, i, scan.scales[i])
    assert all(s.guard is None for s in rep.steps)
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_guard_exponents_must_include_none_and_paper() -> None:
    with pytest.raises(ValueError, match="include 0"):
        PruneConfig(n_layers=1, guard_exponents=(0.5, 1.0))


def test_guarded_lsq_keeps_the_map_only_when_it_lowers_the_loss() -> None:
    model = tiny_model("llama")
    ids = tokens(4, 12)
    pruned = copy.deepcopy(model)
    rep = prune_and_compensate(pruned, ids, PruneConfig(n_layers=2, compensation="lsq"), batch_size=2)
    for step in rep.steps:
        g = step.guard
        assert g is not None and g["map_kept"] is not None
        chosen = g["losses"][g["scales"].index(step.applied_scale)]
        assert (step.gap_map is not None) == g["map_kept"]
        if g["map_kept"]:
            assert g["map_loss"] < chosen + 1e-5
    assert math.isfinite(mean_nll(pruned, ids, batch_size=2))


def test_selection_by_loss_under_the_guard_measures_each_candidate_once() -> None:
    """``--selection loss`` with the guarded default: each pool candidate's best guarded NLL, the lowest removed,
    its guard record kept (not measured a second time), and the loss equal to the really pruned model's."""
    model = tiny_model("llama")
    ids = tokens(4, 12)
    pruned = copy.deepcopy(model)
    rep = prune_and_compensate(pruned, ids, PruneConfig(n_layers=1, selection="loss", selection_pool=3),
                               batch_size=2)
    step = rep.steps[0]
    assert step.selection_losses is not None and len(step.selection_losses) == 3
    assert step.chosen == min(step.selection_losses, key=lambda i: (step.selection_losses[i], i))
    assert step.guard is not None and step.selection_losses[step.chosen] == min(step.guard["losses"])
    assert mean_nll(pruned, ids, batch_size=2) == pytest.approx(step.selection_losses[step.chosen], rel=1e-5)
