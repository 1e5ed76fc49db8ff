"""The final check: the uncompensated view is the plain layer-removed model; worse results are flagged."""

from __future__ import annotations

import copy

import pytest
import torch

from prunecomp.config import PruneConfig
from prunecomp.engine.compress import compress
from prunecomp.engine.final_check import final_check, line, uncompensated_view
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.recipes.apply import apply_recipe
from prunecomp.recipes.recipe import Recipe
from tests.tiny_models import FAMILIES, tiny_model, tokens
from tests.unit.test_guard import _hurting_model


def _naive(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """The same layers removed from the source with nothing folded."""
    plain = Recipe(source=recipe.source, steps=tuple(type(s)(removed=s.removed, current=s.current, scale=None)
                                                     for s in recipe.steps))
    return apply_recipe(copy.deepcopy(model), plain)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compensation", ["magnitude", "lsq"])
def test_uncompensated_view_is_the_plain_removal(family: str, compensation: str) -> None:
    model = tiny_model(family)
    ids = tokens(4, 12)
    pruned = copy.deepcopy(model)
    report = prune_and_compensate(pruned, ids, PruneConfig(n_layers=3, compensation=compensation, protect=[-1]),
                                  batch_size=2)
    recipe = report.recipe({"num_layers": 6})
    assert any(s.scale not in (None, 1.0) for s in recipe.steps)
    expected = mean_nll(_naive(model, recipe), ids, batch_size=2)
    with uncompensated_view(pruned, recipe):
        got = mean_nll(pruned, ids, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
    assert mean_nll(pruned, ids, batch_size=2) != pytest.approx(expected, rel=1e-6)  # hooks are gone again


def test_uncompensated_view_undoes_lsq_maps_and_refinement() -> None:
    model = tiny_model("llama")
    ids = tokens(4, 12)
    pruned = copy.deepcopy(model)
    report = compress(pruned, ids, PruneConfig(n_layers=2, compensation="lsq", refine="norms+writers",
                                               refine_steps=5, protect=[-1]), batch_size=2)
    recipe = report.recipe({"num_layers": 6})
    assert recipe.refine is not None
    expected = mean_nll(_naive(model, recipe), ids, batch_size=2)
    with uncompensated_view(pruned, recipe):
        assert mean_nll(pruned, ids, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_final_check_flags_compensation_that_hurts() -> None:
    model, ids = _hurting_model()
    held = tokens(4, 16, seed=11)
    cfg = dict(n_layers=1, protect=(0, 1, 3, 4, 5))
    paper = copy.deepcopy(model)
    rep = prune_and_compensate(paper, ids, PruneConfig(**cfg, compensation="magnitude"), batch_size=2)
    check = final_check(paper, rep.recipe({"num_layers": 6}), held, "d", batch_size=2)
    assert check.worse and check.verdict == "worse" and check.folded == "scales"
    assert line(check.to_dict()).startswith("WARNING")
    guarded = copy.deepcopy(model)
    rep = prune_and_compensate(guarded, ids, PruneConfig(**cfg), batch_size=2)
    check = final_check(guarded, rep.recipe({"num_layers": 6}), held, "d", batch_size=2)
    assert not check.worse
    assert check.folded == "nothing" and check.loss == check.uncompensated_loss  # the guard declined the scale
    assert line(check.to_dict()).startswith("final check: nothing was folded (held-out calibration perplexity")


def test_line_names_what_was_folded() -> None:
    doc = {"ppl": 20.0, "uncompensated_ppl": 25.0, "verdict": "better", "windows": 8, "folded": "scales+maps+refine"}
    assert "with the scales, lsq maps and refinement gains folded vs 25.000 without (better" in line(doc)
    worse = doc | {"ppl": 30.0, "verdict": "worse", "folded": "scales+refine"}
    assert line(worse).startswith("WARNING: the scales and refinement gains folded by this run made the model WORSE")
