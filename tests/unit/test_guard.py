"""Guarded compensation: the grid, the search, the choice, the exactness of the cheap tail measurement, the budget
(a share of the windows, a few candidates) against the exhaustive grid, and the decisions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prunecomp.config import PruneConfig
from prunecomp.engine.incremental import IncrementalScanner
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.engine.streamed import StreamedModel
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.method.compensation import compensate
from prunecomp.method.guard import (
    EXHAUSTIVE,
    GuardBudget,
    candidate_scales,
    gap_stream,
    guard_cell,
    guard_in_memory,
    guard_line,
    next_exponents,
    parabola,
    pick,
)
from prunecomp.method.scoring import scan_layers
from prunecomp.models.pruning import remove_layer
from prunecomp.models.sequential import head_nll
from tests.tiny_models import FAMILIES, tiny_model, tokens

GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


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
    result = guard_in_memory(model, ids, current, s, (0.0, 0.5, 1.0, 1.25), batch_size=2, budget=EXHAUSTIVE)
    assert result.exponents == [0.0, 0.5, 1.0, 1.25]
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
    # on a share of the windows (the first 3 of 4: the cached batch cut short gets its own kwargs) too
    part = GuardBudget(fraction=0.75, min_tokens=1)
    fresh = guard_in_memory(model, ids, 3, scan.scales[3], (0.0, 1.0), batch_size=2, budget=part)
    cached = guard_in_memory(model, ids, 3, scan.scales[3], (0.0, 1.0), batch_size=2, cached=scanner.boundary(3),
                             budget=part)
    assert (fresh.windows, fresh.of_windows, fresh.tokens, fresh.stride) == (3, 4, 3 * 6, 2)  # every other position
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


def _curve(a_star: float, curvature: float = 1.0) -> dict[float, float]:
    return {a: 4.0 + curvature * (a - a_star) ** 2 for a in GRID}


def _search(losses: dict[float, float], grid: tuple[float, ...] = GRID) -> tuple[float, int]:
    """Run :func:`next_exponents` against known losses: the measured best and how many were measured."""
    measured: dict[float, float] = {}
    while todo := next_exponents(grid, measured):
        assert not set(todo) & set(measured)
        measured |= {a: losses[a] for a in todo}
    keys = sorted(measured)
    return keys[pick(keys, [measured[a] for a in keys])], len(measured)


@pytest.mark.parametrize("a_star", [-0.5, 0.0, 0.1, 0.3, 0.45, 0.6, 0.8, 0.95, 1.1, 1.2, 1.6, 3.0])
def test_parabola_search_finds_the_grids_best_in_at_most_four(a_star: float) -> None:
    """On a loss that is a parabola in the exponent (what the guard measures is close to one over the grid's
    range), the search ends on the exhaustive grid's choice having measured 3 or 4 of the 6 exponents."""
    losses = _curve(a_star)
    best, n = _search(losses)
    assert best == GRID[pick(GRID, [losses[a] for a in GRID])]
    assert n <= 4


def test_search_on_other_shapes_and_grids() -> None:
    flat = {a: 4.0 for a in GRID}
    assert _search(flat)[0] == 1.0  # nothing to gain: the paper's scale (ties go to it)
    down = {a: 4.0 - a for a in GRID}  # more compensation always better: the grid's end
    assert _search(down)[0] == 1.25
    concave = {0.0: 4.0, 0.25: 3.999, 0.5: 3.997, 0.75: 3.994, 1.0: 3.99, 1.25: 3.5}  # no convex fit: local search
    assert _search(concave) == (1.25, 3)
    assert _search({0.0: 2.0, 1.0: 1.0}, (0.0, 1.0)) == (1.0, 2)
    wide = {a: (a - 0.3) ** 2 for a in (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)}
    assert _search(wide, tuple(wide))[0] == 0.5
    c2, c1, c0 = parabola({0.0: 4.0 + 0.09, 1.0: 4.0 + 0.49, 2.0: 4.0 + 2.89})
    assert (c2, c1, c0) == pytest.approx((1.0, -0.6, 4.09))


def test_budget_windows() -> None:
    default = GuardBudget()
    assert (default.windows(32, 256), default.positions(32, 256)) == (2, 2)  # the cpu preset: 2 of 32 windows
    assert (default.windows(128, 2048), default.positions(128, 2048)) == (4, 2)  # the paper's protocol: 1/32
    assert (default.windows(4, 12), default.positions(4, 12)) == (4, 1)  # a small calibration set: all of it
    assert (EXHAUSTIVE.windows(32, 256), EXHAUSTIVE.positions(32, 256)) == (32, 1)


def _clear(losses: list[float]) -> bool:
    """The grid's choice is clear: its loss beats every other point's by a margin well above float noise."""
    best = min(losses)
    return all(v - best > 1e-4 * abs(best) for v in losses if v != best)


@pytest.mark.parametrize("family", FAMILIES)
def test_budgeted_guard_chooses_as_the_exhaustive_grid(family: str) -> None:
    """The guard's search against every exponent on every window, at several gaps. On the same windows: the same
    exponent wherever the grid's choice is clear, and the same numbers. On half the windows (what the default
    budget does to a larger set): what it folds costs, on the whole set, at most 3 standard errors (of the paired
    per-window difference, on the windows it measured) more than the grid's best: the stated tolerance."""
    model = tiny_model(family)
    ids = tokens(16, 24, seed=2)
    scanner = IncrementalScanner(model, ids, batch_size=4)
    scan = scanner.scan("bi")
    half = GuardBudget(fraction=0.5, min_tokens=1)
    for current in (1, 2, 3, 4):
        s, cached = scan.scales[current], scanner.boundary(current)
        full = guard_in_memory(model, ids, current, s, GRID, batch_size=4, budget=EXHAUSTIVE, cached=cached)
        same = guard_in_memory(model, ids, current, s, GRID, batch_size=4, budget=GuardBudget(fraction=1.0),
                               cached=cached)
        part = guard_in_memory(model, ids, current, s, GRID, batch_size=4, budget=half, cached=cached)
        assert full.exponents == list(GRID) and len(same.exponents) <= 4 and len(part.exponents) <= 4
        assert (part.windows, part.of_windows, part.tokens) == (8, 16, 8 * 12)
        by_a = dict(zip(full.exponents, full.losses, strict=True))
        for a, loss in zip(same.exponents, same.losses, strict=True):
            assert loss == pytest.approx(by_a[a], rel=1e-6)
        if _clear(full.losses):
            assert same.exponents[same.chosen] == full.exponents[full.chosen]
        chosen, best = part.exponents[part.chosen], full.exponents[full.chosen]
        per_window = [guard_in_memory(model, ids[w : w + 1], current, s, (0.0, chosen, best, 1.0), batch_size=1,
                                      budget=EXHAUSTIVE) for w in range(part.windows)]
        diffs = torch.tensor([r.losses[r.exponents.index(chosen)] - r.losses[r.exponents.index(best)]
                              for r in per_window], dtype=torch.float64)
        se = float(diffs.std() / math.sqrt(len(diffs))) if chosen != best else 0.0
        assert by_a[chosen] - full.loss <= 3 * se + 1e-6 * full.loss


def test_chunked_head_equals_the_models_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head computes a few tokens' logits at a time; the summed NLL is the model's own loss."""
    import prunecomp.models.sequential as sequential

    model = tiny_model("gemma3")  # soft-capped logits
    ids = tokens(3, 12)
    with torch.no_grad():
        ref = float(model(input_ids=ids, labels=ids).loss)
    x = gap_stream(model, ids, len(model.model.layers), batch_size=3)[0][0]  # the stream leaving the last layer
    whole, n = head_nll(model, x, ids)
    monkeypatch.setattr(sequential, "HEAD_CHUNK_ELEMENTS", 97 * 5)  # 5 tokens per chunk
    chunked, m = head_nll(model, x, ids)
    assert n == m == 3 * 11
    assert chunked / n == pytest.approx(ref, rel=1e-6) and whole / n == pytest.approx(ref, rel=1e-6)
    with torch.no_grad():
        per_token = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].transpose(1, 2),
                                                      ids[:, 1:], reduction="none")
    sampled, k = head_nll(model, x, ids, stride=2)  # positions 0, 2, ..., 10 of every window
    assert k == 3 * 6 and sampled == pytest.approx(float(per_token[:, ::2].sum()), rel=1e-6)


def test_streamed_guard_decides_as_the_in_memory_guard(tmp_path) -> None:
    """One search for both: the layer-streamed guard measures the same windows, candidates and losses."""
    model = tiny_model("llama")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ids = tokens(8, 16, seed=4)
    s = scan_layers(model, ids, "bi", batch_size=4).scales[2]
    budget = GuardBudget(fraction=0.25, min_tokens=1)
    ours = guard_in_memory(model, ids, 2, s, GRID, batch_size=4, budget=budget)
    streamed = StreamedModel(folder).guard(ids, 2, s, GRID, batch_size=4, budget=budget, memory_bytes=1)
    assert streamed.exponents == ours.exponents and streamed.chosen == ours.chosen
    assert streamed.losses == pytest.approx(ours.losses, rel=1e-5)
    assert (streamed.windows, streamed.of_windows, streamed.rounds) == (ours.windows, ours.of_windows, ours.rounds)


def test_record_says_what_was_measured() -> None:
    model = tiny_model("llama")
    ids = tokens(8, 16)
    s = scan_layers(model, ids, "bi", batch_size=4).scales[2]
    result = guard_in_memory(model, ids, 2, s, GRID, batch_size=4, budget=GuardBudget(fraction=0.25, min_tokens=1))
    doc = result.to_dict()
    assert doc["grid"] == list(GRID) and set(doc["exponents"]) <= set(GRID) and {0.0, 1.0} <= set(doc["exponents"])
    m = doc["measured"]
    assert (m["windows"], m["of_windows"], m["tokens"], m["stride"], m["search"]) == (2, 8, 2 * 8, 2, "parabola")
    assert m["candidates"] == len(doc["exponents"]) and 3 <= m["candidates"] <= 4 and m["rounds"] >= 2
    assert "on 2 of 8 windows" in guard_line(doc)
