"""Block reconstruction on a layer-streamed model: the same fits, the same output model, the same recipe and the
same final check as in memory; fitted layers live in spill files, and records of them are read lazily."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM

from prunecomp.config import PruneConfig
from prunecomp.engine.final_check import final_check, reconstructed_layers
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.engine.streamed import StreamedModel
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import remove_layer
from prunecomp.models.tensorfiles import LazyTensors, Renamed, write_safetensors
from prunecomp.recipes.apply import apply_recipe
from prunecomp.recipes.recipe import Recipe, RecipeStep, RefineEdit, read_recipe

CAL = tokens(n=6, t=16)
FIT = tokens(n=8, t=16, seed=7)
HELD = tokens(n=4, t=16, seed=11)
DECIDE = tokens(n=4, t=16, seed=13)  # the held-out windows each fit must improve


@pytest.fixture(params=["llama", "llama-tied", "qwen3", "gemma3"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, str]:
    model = tiny_model(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(folder, max_shard_size="20KB")
    return model, str(folder)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_streamed_reconstruct_equals_in_memory(saved: tuple[torch.nn.Module, str], tmp_path) -> None:
    model, folder = saved
    config = PruneConfig(metric="bi", n_layers=3, compensation="magnitude", reconstruct="both",
                         reconstruct_steps=4, reconstruct_lr=1e-2, scoring="exact")
    ref = copy.deepcopy(model)
    ref_report = prune_and_compensate(ref, CAL, config, batch_size=4, fit_windows=FIT, check_windows=DECIDE)

    sm = StreamedModel(folder, spill_dir=tmp_path / "spill")
    report = prune_and_compensate(sm, CAL, config, batch_size=4, fit_windows=FIT, check_windows=DECIDE)
    assert report.removed == ref_report.removed
    kept_fits = 0
    for a, b in zip(ref_report.steps, report.steps, strict=True):
        assert a.reconstruct is not None and b.reconstruct is not None
        same = ("side", "layers", "target", "windows", "kept", "check_windows")
        assert {k: b.reconstruct[k] for k in same} == {k: a.reconstruct[k] for k in same}
        assert b.reconstruct["check_windows"] == 4
        for key in ("loss_after", "check_loss_before", "check_loss_after"):
            assert b.reconstruct[key] == pytest.approx(a.reconstruct[key], rel=1e-4)
        assert (a.layer_weights is None) == (b.layer_weights is None)
        if b.layer_weights is not None:  # the record: the same names and values, read from the spill files
            kept_fits += 1
            assert sorted(b.layer_weights) == sorted(a.layer_weights)
            for name in a.layer_weights:
                torch.testing.assert_close(b.layer_weights[name], a.layer_weights[name], rtol=1e-3, atol=1e-4)
    assert kept_fits and len(list((tmp_path / "spill").glob("*.safetensors"))) == 2 * kept_fits

    out = sm.save(str(tmp_path / "pruned"), recipe=report.recipe({"content_hash": "x"}))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(loaded, CAL), _logits(ref, CAL), rtol=1e-4, atol=1e-4)

    # the written recipe replays in memory, and on a fresh streamed model, to the same model
    recipe = read_recipe(out)
    assert recipe.digest() == report.recipe({"content_hash": "x"}).digest()
    replayed = apply_recipe(copy.deepcopy(model), recipe)
    torch.testing.assert_close(_logits(replayed, CAL), _logits(loaded, CAL), rtol=1e-5, atol=1e-5)
    again = StreamedModel(folder)
    again.apply(recipe)
    loaded2 = AutoModelForCausalLM.from_pretrained(again.save(str(tmp_path / "replayed"))).eval()
    torch.testing.assert_close(_logits(loaded2, CAL), _logits(loaded, CAL), rtol=1e-5, atol=1e-5)

    # the final check: streamed (the source's weights loaded for the rewritten layers) = in memory, and its
    # baseline is exactly the same layers removed with nothing folded and nothing fitted
    ref_recipe = ref_report.recipe({"content_hash": "x"})
    rewritten = reconstructed_layers(ref_recipe, len(decoder_layers(ref)))
    assert rewritten
    source = decoder_layers(model)
    originals = {j: dict(source[o].named_parameters()) for j, o in rewritten.items()}
    mine = final_check(ref, ref_recipe, HELD, "d", originals=originals)
    streamed = final_check(sm, recipe, HELD, "d")  # the streamed backend loads the source's layers itself
    plain = copy.deepcopy(model)
    for i in sorted(report.removed, reverse=True):
        remove_layer(plain, i)
    assert streamed.loss == pytest.approx(mine.loss, rel=1e-5)
    assert streamed.uncompensated_loss == pytest.approx(mine.uncompensated_loss, rel=1e-5)
    assert streamed.uncompensated_loss == pytest.approx(mean_nll(plain, HELD, batch_size=4), rel=1e-5)
    assert sm.mean_nll(HELD, batch_size=4) == pytest.approx(streamed.loss, rel=1e-6)  # the view is undone


def test_streamed_apply_refuses_what_it_cannot_replay(tmp_path) -> None:
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    sm = StreamedModel(tmp_path / "m")
    step = RecipeStep(removed=1, current=1, scale=None)
    for recipe in (Recipe(source={"content_hash": "x"}, steps=(step,), refine=RefineEdit(gains={})),
                   Recipe(source={"content_hash": "x"}, steps=(replace(step, gap_map=torch.eye(64)),))):
        with pytest.raises(PrunecompError, match="lsq maps or refinement gains"):
            sm.apply(recipe)
    assert sm.layer_loads == 0


def test_write_safetensors_round_trip_and_lazy_records(tmp_path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.tensor([True, False]),
               "d": torch.zeros(0, 2), "e": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    write_safetensors(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    lazy = LazyTensors(tmp_path / "t.safetensors", prefix="p.")
    assert sorted(lazy) == [f"p.{k}" for k in sorted(tensors)] and "p.a" in lazy and "a" not in lazy
    assert lazy.meta("p.b") == (torch.bfloat16, (5,))
    renamed = Renamed(lazy, {"x": "p.a", "y": "p.e"})
    assert torch.equal(renamed["y"], tensors["e"]) and renamed.meta("x") == (torch.float32, (3, 4))
    write_safetensors(renamed, tmp_path / "r.safetensors")  # lazy in, streamed out
    assert torch.equal(load_file(str(tmp_path / "r.safetensors"))["x"], tensors["a"])
    with pytest.raises(KeyError, match=r"no tensor 'p\.z'"):
        Renamed(lazy, {"x": "p.z"})


def test_recipe_naming_a_missing_tensor_is_malformed() -> None:
    doc = {"format": "prunecomp.recipe/v3", "source": {"content_hash": "x"},
           "steps": [{"removed": 1, "current": 1, "scale": None, "layers": {"model.layers.1.w": "steps.0.layers.w"}}]}
    with pytest.raises(PrunecompError, match="malformed recipe"):
        Recipe.from_json(doc, {})


def test_unreadable_recipe_tensors_are_one_error(tmp_path) -> None:
    """read_recipe opens a local recipe's tensors lazily; a file that is not safetensors is still refused up front."""
    from prunecomp.recipes.recipe import write_recipe_files

    step = RecipeStep(removed=1, current=1, scale=None, layers={"model.layers.1.w": torch.ones(2)})
    write_recipe_files(Recipe(source={"content_hash": "x"}, steps=(step,)), tmp_path)
    assert torch.equal(read_recipe(tmp_path).steps[0].layers["model.layers.1.w"], torch.ones(2))  # type: ignore[index]
    (tmp_path / "recipe.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PrunecompError, match="unreadable"):
        read_recipe(tmp_path)
