"""Progressive refinement (``refine_at="each"``): refine after every removal, re-score the refined model.

What could fail: the loop not re-scoring the refined model, the recipe not replaying bit for bit (gains named by
the module's index at the time of the fit), the final check not undoing gains of layers that moved, the pipeline's
part-by-part assembly giving another digest than the in-memory run, and unsupported combinations slipping by."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from prunecomp.config import PruneConfig
from prunecomp.engine.compress import compress
from prunecomp.engine.final_check import output_edits, uncompensated_view
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.method.refine import refine, teacher_targets
from prunecomp.recipes.apply import apply_recipe
from prunecomp.recipes.recipe import (
    FORMAT,
    FORMAT_PROGRESSIVE,
    RECIPE_FILE,
    Recipe,
    RecipeStep,
    read_recipe,
    write_recipe_files,
)
from tests.tiny_models import FAMILIES, tiny_model, tokens
from tests.unit.test_final_check import _naive
from tests.unit.test_recipe import SOURCE, _model, _same


def _cfg(**kw: object) -> PruneConfig:
    base = dict(n_layers=3, metric="bi", protect=[], refine="channels", refine_at="each", refine_steps=4,
                refine_lr=1e-2, refine_topk=8)  # 2e-2 overshot the first fit under the tail loss
    return PruneConfig(**(base | kw))


def test_each_removal_is_refined_and_the_refined_model_is_rescored() -> None:
    """compress(each) is exactly: remove one (scored on the current model), refine, remove the next, ..."""
    ids = tokens(4, 16)
    cfg = _cfg()
    ran = tiny_model("llama")
    report = compress(ran, ids, cfg, batch_size=2)
    assert len(report.steps) == 3 and report.refine is None
    assert all(s.refine is not None and s.refine["steps"] == 4 for s in report.steps)
    assert all(s.refine["loss_after"] < s.refine["loss_before"] for s in report.steps)

    by_hand = tiny_model("llama")
    targets = teacher_targets(by_hand, ids, topk=8)
    for n in (1, 2, 3):
        prune_and_compensate(by_hand, ids, cfg.model_copy(update={"n_layers": n, "refine": "none"}), batch_size=2)
        refine(by_hand, ids, targets, mode="channels", steps=4, lr=1e-2, batch_size=2)
    _same(by_hand, ran)
    # the scores of step 2 are those of the refined model: they differ from a run refined only at the end
    end = tiny_model("llama")
    end_report = compress(end, ids, cfg.model_copy(update={"refine_at": "end"}), batch_size=2)
    assert report.steps[1].scores != end_report.steps[1].scores
    assert end_report.refine is not None and all(s.refine is None for s in end_report.steps)


@pytest.mark.parametrize("family", [*FAMILIES, "gemma2"])
def test_progressive_recipe_replays_bit_identically(family: str, tmp_path: Path) -> None:
    ran = _model(family)
    report = compress(ran, tokens(4, 16), _cfg(), batch_size=2)
    recipe = report.recipe(SOURCE | {"architecture": type(ran).__name__})
    assert recipe.progressive and recipe.refine is not None  # the last fit is the recipe's end refinement
    assert [s.refine is not None for s in recipe.steps] == [True, True, False]
    write_recipe_files(recipe, tmp_path)
    assert f'"{FORMAT_PROGRESSIVE}"' in (tmp_path / RECIPE_FILE).read_text()
    back = read_recipe(tmp_path)
    assert back.digest() == recipe.digest() and back.edits() == recipe.edits()
    _same(apply_recipe(_model(family), back), ran)
    # from any intermediate state: prefix(n) is the model right after step n's folds, and the recipe goes on
    for n in (1, 2, 3):
        half = apply_recipe(_model(family), recipe.prefix(n))
        _same(apply_recipe(half, recipe, start=n), ran)
    # and from the state after step 1's fit (the pipeline's working copy after a refine task)
    after_fit = apply_recipe(_model(family), recipe.prefix(1))
    assert recipe.steps[0].refine is not None
    from prunecomp.recipes.apply import apply_refine

    apply_refine(after_fit, recipe.steps[0].refine)
    _same(apply_recipe(after_fit, recipe, start=1, refined=True), ran)


def test_pipeline_assembly_gives_the_same_recipe() -> None:
    """Parts appended one by one (step, refine, step, refine, ...) make the in-memory run's recipe and digest."""
    ran = tiny_model("qwen3")
    recipe = compress(ran, tokens(4, 16), _cfg(), batch_size=2).recipe(SOURCE)
    built = Recipe(source=SOURCE)
    states = [built.digest()]
    for i, step in enumerate(recipe.steps):
        built = built.plus(RecipeStep(removed=step.removed, current=step.current, scale=step.scale,
                                      record=step.record))
        states.append(built.digest())
        fit = step.refine if i < len(recipe.steps) - 1 else recipe.refine
        assert fit is not None
        built = built.with_refine(fit)
        states.append(built.digest())
    assert built.digest() == recipe.digest() and built.edits() == recipe.edits()
    assert len(set(states)) == len(states)  # every state has its own identity
    # a recipe without refinement keeps the v1 form (and the digest it always had)
    plain = prune_and_compensate(tiny_model("qwen3"), tokens(4, 16), PruneConfig(n_layers=2, protect=[]),
                                 batch_size=2).recipe(SOURCE)
    assert not plain.progressive and plain.to_json()[0]["format"] == FORMAT
    assert all("refine" not in e for e in plain.edits())


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen3", "gemma3"])
def test_final_check_undoes_every_fit_of_a_progressive_run(family: str) -> None:
    model = _model(family)
    ids = tokens(4, 12)
    pruned = copy.deepcopy(model)
    recipe = compress(pruned, ids, _cfg(protect=[-1]), batch_size=2).recipe({"num_layers": 6})
    edits = output_edits(pruned, recipe)
    assert sum(kind == "gain" for _, ops in edits.values() for kind, _ in ops) > 10
    expected = mean_nll(_naive(model, recipe), ids, batch_size=2)
    assert mean_nll(pruned, ids, batch_size=2) != pytest.approx(expected, rel=1e-4)
    with uncompensated_view(pruned, recipe):
        assert mean_nll(pruned, ids, batch_size=2) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["llama-tied", "qwen3"])
def test_progressive_lsq_final_check_and_replay(family: str, tmp_path: Path) -> None:
    """With ``lsq`` a step's gap map is folded into a writer whose output earlier fits already scaled by gains,
    and later fits scale it again: map and gains do not commute, so the final check must undo them in fold order
    (undoing all gains first, then the maps, misses the plain model), and the replay must fold them in that order."""
    model = _model(family)
    ids = tokens(4, 16)
    pruned = copy.deepcopy(model)
    report = compress(pruned, ids, _cfg(protect=[-1], compensation="lsq"), batch_size=2)
    recipe = report.recipe(SOURCE | {"architecture": type(pruned).__name__, "num_layers": 6})
    assert any(s.gap_map is not None for s in recipe.steps[1:])  # a map folded after a fit (this seed keeps one)
    edits = output_edits(pruned, recipe)
    kinds = [[k for k, _ in ops] for _, ops in edits.values()]
    assert any("map" in ks and "gain" in ks[: ks.index("map")] for ks in kinds)  # gains, then a map
    expected = mean_nll(_naive(model, recipe), ids, batch_size=2)
    with uncompensated_view(pruned, recipe):
        assert mean_nll(pruned, ids, batch_size=2) == pytest.approx(expected, rel=1e-5)
    write_recipe_files(recipe, tmp_path)
    _same(apply_recipe(_model(family), read_recipe(tmp_path)), pruned)


def test_gains_follow_their_layer_to_its_final_index() -> None:
    """Bookkeeping by hand: a gain fitted on layer index 3 after removing original layer 1 belongs to original
    layer 4; after a later removal of original layer 2 it sits at index 2. A gain on a layer removed later is
    gone; gains on the same module are kept in fold order (they multiply)."""
    from prunecomp.recipes.recipe import RefineEdit

    model = tiny_model("llama")  # 6 layers
    g = {p: torch.full((32,), v) for p, v in (("a", 2.0), ("b", 3.0), ("c", 5.0))}
    o_proj = "model.layers.{}.self_attn.o_proj"
    fit1 = RefineEdit({o_proj.format(3): ("linear", 0.0, g["a"]), o_proj.format(1): ("linear", 0.0, g["c"])})
    fit2 = RefineEdit({o_proj.format(2): ("linear", 0.0, g["b"])})
    recipe = Recipe(source={"num_layers": 6}, steps=(
        RecipeStep(removed=1, current=1, scale=None, refine=fit1),  # kept: 0 2 3 4 5; index 3 = original 4,
        RecipeStep(removed=2, current=1, scale=None),  # index 1 = original 2 (removed next); kept: 0 3 4 5
    ), refine=fit2)  # index 2 of the final model = original 4
    for i in (5, 2):
        del model.model.layers[i]
    edits = output_edits(model, recipe)
    assert list(edits) == [o_proj.format(2)]
    scale, ops = edits[o_proj.format(2)]
    assert scale == 1.0 and [k for k, _ in ops] == ["gain", "gain"]  # in fold order
    assert torch.equal(ops[0][1] * ops[1][1], torch.full((32,), 6.0))


def test_unsupported_combinations_are_refused() -> None:
    _cfg(compensation="lsq")  # supported since maps and gains are undone in fold order
    with pytest.raises(ValidationError, match="iterative"):
        _cfg(mode="one-shot")
    _cfg(refine="none", compensation="lsq")  # without refinement refine_at is moot
    with pytest.raises(ValueError, match="twice"):
        from prunecomp.recipes.recipe import RefineEdit

        fit = RefineEdit({})
        Recipe(source={}, steps=(RecipeStep(removed=0, current=0, scale=None, refine=fit),), refine=fit)
