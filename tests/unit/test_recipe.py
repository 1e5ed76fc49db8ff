"""Recipes: replaying one on the source gives the in-process run's tensors bit for bit, on every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunecomp.config import PruneConfig
from prunecomp.engine.compress import compress
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.errors import PrunecompError
from prunecomp.recipes.apply import apply_recipe
from prunecomp.recipes.recipe import (
    RECIPE_FILE,
    TENSORS_FILE,
    read_recipe,
    recipe_from_report,
    write_recipe_files,
)
from tests.tiny_models import FAMILIES, gemma2_model, tiny_model, tokens


def _model(family: str) -> torch.nn.Module:
    return gemma2_model() if family == "gemma2" else tiny_model(family)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.config.prunecomp == b.config.prunecomp and a.config.num_hidden_layers == b.config.num_hidden_layers


SOURCE = {"content_hash": "h" * 64, "uri": "tiny"}


@pytest.mark.parametrize("family", [*FAMILIES, "gemma2"])
@pytest.mark.parametrize("variant", ["magnitude", "lsq", "none", "one-shot"])
def test_replay_is_bit_identical(family: str, variant: str, tmp_path: Path) -> None:
    mode = "one-shot" if variant == "one-shot" else "iterative"
    comp = "magnitude" if variant == "one-shot" else variant
    cfg = PruneConfig(n_layers=3, metric="bi", mode=mode, compensation=comp, protect=[])
    ran = _model(family)
    report = prune_and_compensate(ran, tokens(4, 16), cfg, batch_size=2)
    recipe = report.recipe(SOURCE | {"architecture": type(ran).__name__})
    write_recipe_files(recipe, tmp_path)
    assert (tmp_path / TENSORS_FILE).is_file() == any(s.gap_map is not None for s in recipe.steps)
    back = read_recipe(tmp_path)
    assert back.digest() == recipe.digest() and back.removed == report.removed
    _same(apply_recipe(_model(family), back), ran)


def test_refined_recipe_is_bit_identical(tmp_path: Path) -> None:
    cfg = PruneConfig(n_layers=2, metric="bi", compensation="magnitude", refine="channels", refine_steps=3,
                      refine_batch=2, refine_topk=8)
    ran = tiny_model("llama")
    report = compress(ran, tokens(4, 16), cfg, batch_size=2)
    recipe = report.recipe(SOURCE | {"architecture": "LlamaForCausalLM"})
    assert recipe.refine is not None and len(recipe.refine.gains) > 10
    write_recipe_files(recipe, tmp_path)
    _same(apply_recipe(tiny_model("llama"), read_recipe(tmp_path)), ran)


def test_replay_continues_from_a_prefix_and_digest_tracks_edits() -> None:
    cfg = PruneConfig(n_layers=3, metric="bi", protect=[])
    ran = tiny_model("qwen3")
    recipe = prune_and_compensate(ran, tokens(4, 16), cfg, batch_size=2).recipe(SOURCE)
    half = apply_recipe(tiny_model("qwen3"), recipe.prefix(1))
    _same(apply_recipe(half, recipe, start=1), ran)
    digests = {recipe.digest(), recipe.prefix(2).digest(), recipe.prefix(0).digest()}
    assert len(digests) == 3
    with pytest.raises(PrunecompError, match="not where the recipe"):
        apply_recipe(tiny_model("qwen3"), recipe, start=1)  # the model is not at step 1


def test_bad_recipes_are_refused(tmp_path: Path) -> None:
    cfg = PruneConfig(n_layers=2, metric="bi")
    recipe = prune_and_compensate(tiny_model("llama"), tokens(4, 16), cfg, batch_size=2).recipe(
        SOURCE | {"architecture": "LlamaForCausalLM"})
    with pytest.raises(PrunecompError, match="is for LlamaForCausalLM"):
        apply_recipe(tiny_model("qwen2"), recipe)
    write_recipe_files(recipe, tmp_path)
    doc = json.loads((tmp_path / RECIPE_FILE).read_text())
    doc["steps"][0]["scale"] = 2.0
    (tmp_path / RECIPE_FILE).write_text(json.dumps(doc))
    with pytest.raises(PrunecompError, match="digest does not match"):
        read_recipe(tmp_path)
    (tmp_path / RECIPE_FILE).write_text("{not json")
    with pytest.raises(PrunecompError, match="not valid JSON"):
        read_recipe(tmp_path)
    with pytest.raises(PrunecompError, match="not found"):
        read_recipe(tmp_path / "nope")


def test_recipe_from_a_json_report_replays_exactly() -> None:
    """A JSON report (floats round-trip) rebuilds the recipe of a magnitude or uncompensated run; lsq is refused."""
    for comp in ("magnitude", "none"):
        ran = tiny_model("llama-tied")
        report = prune_and_compensate(ran, tokens(4, 16), PruneConfig(n_layers=3, metric="bi", compensation=comp),
                                      batch_size=2)
        doc = json.loads(json.dumps(report.to_dict() | {"source": {"content_hash": "h"}}))
        _same(apply_recipe(tiny_model("llama-tied"), recipe_from_report(doc)), ran)
    lsq = prune_and_compensate(tiny_model("llama"), tokens(4, 16), PruneConfig(n_layers=2, compensation="lsq"),
                               batch_size=2).to_dict()
    with pytest.raises(PrunecompError, match="JSON report does not hold"):
        recipe_from_report(json.loads(json.dumps(lsq)))


def test_steps_with_different_tensors_are_not_equal() -> None:
    """Equality of recipe steps covers their tensors (by digest), not only the layer and the scale; the audit
    record is not compared."""
    import torch

    from prunecomp.recipes.recipe import RecipeStep

    a = RecipeStep(removed=2, current=2, scale=1.1, gap_map=torch.ones(3, 3))
    b = RecipeStep(removed=2, current=2, scale=1.1, gap_map=torch.zeros(3, 3))
    assert a != b and a == RecipeStep(removed=2, current=2, scale=1.1, gap_map=torch.ones(3, 3), record={"x": 1})
    la = RecipeStep(removed=1, current=1, scale=None, layers={"w": torch.ones(2)})
    assert la != RecipeStep(removed=1, current=1, scale=None, layers={"w": torch.full((2,), 2.0)})
    assert la != RecipeStep(removed=1, current=1, scale=None)
