"""Sequential layer-wise refit (``refit="sequential"``): it fits each layer after the first gap to the dense
stream after the same original layer (checked against a plain forward of the dense model), leaves the layers
before the gap alone, reads the dense layers one at a time from a safetensors folder exactly as from memory,
replays bit for bit from its recipe on a tiny model of every family, and the final check's view of the refitted
model is the plain removal."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from prunecomp.config import PruneConfig
from prunecomp.engine.compress import compress
from prunecomp.engine.final_check import final_check, reconstructed_layers
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.errors import PrunecompError
from prunecomp.method.reconstruct import relative_error
from prunecomp.method.refit import InMemoryDense, describe_refit, first_gap, sequential_refit
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import remove_layer
from tests.layer_checks import replays_and_views
from tests.tiny_models import FAMILIES, tiny_model, tokens

SOURCE = {"content_hash": "tiny"}


def test_each_layer_is_fitted_to_the_dense_stream_after_its_original_layer() -> None:
    source, ids = tiny_model("llama"), tokens(8, 16)
    model = copy.deepcopy(source)
    prune_and_compensate(model, ids, PruneConfig(n_layers=2, protect=(0, 1, 3, 5)))  # removes 2 and 4
    assert first_gap(model) == 2
    before_gap = copy.deepcopy(decoder_layers(model)[:2].state_dict())
    seen: list[tuple[int, float, float]] = []
    report, weights = sequential_refit(model, ids, InMemoryDense(source), steps=30, lr=1e-3, batch_size=2,
                                       on_layer=lambda o, b, a: seen.append((o, b, a)))
    assert report.layers == [3, 5] and [s[0] for s in seen] == [3, 5]
    assert all(a < b for b, a in zip(report.loss_before, report.loss_after, strict=True))
    for k, v in decoder_layers(model)[:2].state_dict().items():  # upstream of the first gap: untouched
        assert torch.equal(v, before_gap[k]), k
    assert weights and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in weights)
    # The reported "after" error is the error of the fitted layer on the stream of the refitted model so far,
    # against the dense model's stream after the same original layer.
    with torch.no_grad():
        dense = source(input_ids=ids, output_hidden_states=True).hidden_states
        pruned = model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[j + 1] leaves layer j (the last one after the final norm, so compare layer 2 = original 3);
    # the error is the mean over the batches of 2 windows
    got = sum(float(relative_error(pruned[3][b : b + 2], dense[4][b : b + 2])) for b in range(0, 8, 2)) / 4
    assert got == pytest.approx(report.loss_after[0], rel=1e-4)
    assert "refitted layers 3..5 (2) to the dense stream" in describe_refit(report.to_dict())


def test_only_the_last_layers_removed_leaves_nothing_to_refit() -> None:
    source, ids = tiny_model("llama"), tokens(4, 8)
    model = copy.deepcopy(source)
    remove_layer(model, 5)
    report, weights = sequential_refit(model, ids, InMemoryDense(source), steps=2, lr=1e-3)
    assert report.layers == [] and weights == {}
    assert "nothing refitted" in describe_refit(report.to_dict())


def test_the_dense_model_must_be_whole_and_the_right_depth() -> None:
    source, ids = tiny_model("llama"), tokens(4, 8)
    pruned = copy.deepcopy(source)
    remove_layer(pruned, 2)
    with pytest.raises(PrunecompError, match="all its layers"):
        InMemoryDense(pruned)
    pruned.config.prunecomp = {**pruned.config.prunecomp, "source_num_layers": 7}  # pruned from another source
    with pytest.raises(PrunecompError, match="dense model has 6 layers"):
        sequential_refit(pruned, ids, InMemoryDense(source), steps=1, lr=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_replays_bit_for_bit_and_the_view_is_the_plain_removal(family: str, tmp_path) -> None:
    source, ids = tiny_model(family), tokens(8, 16)
    model = copy.deepcopy(source)
    config = PruneConfig(n_layers=2, reconstruct="both", reconstruct_steps=5, reconstruct_batch=2,
                         refit="sequential", refit_steps=10, refine="norms", refine_steps=3)
    seen = []
    report = compress(model, ids, config, teacher=source, dense=source, on_refit=seen.append)
    assert report.refit is not None and seen and report.refit["layers"] == seen[0].layers
    assert report.refit["layers"] == [o for o in range(6) if o > min(report.removed) and o not in report.removed]
    assert report.refine is not None  # refinement ran after the refit
    recipe = report.recipe(SOURCE | {"architecture": type(model).__name__})
    originals = replays_and_views(source, model, recipe, ids, tmp_path)
    assert set(report.refit["layers"]) <= set(reconstructed_layers(recipe, 4).values())
    assert "reconstruct" in final_check(model, recipe, ids, "d", originals=originals).folded


def test_dense_layers_read_from_a_folder_give_the_same_refit(tmp_path) -> None:
    from prunecomp.engine.streamed import StreamedModel

    source, ids = tiny_model("llama"), tokens(8, 16)
    source.save_pretrained(tmp_path / "src")
    config = PruneConfig(n_layers=2, refit="sequential", refit_steps=5)
    a, b = copy.deepcopy(source), copy.deepcopy(source)
    ra = compress(a, ids, config, dense=source)
    rb = compress(b, ids, config, dense=StreamedModel(tmp_path / "src", device="cpu", dtype=torch.float32))
    assert ra.refit["layers"] == rb.refit["layers"]  # type: ignore[index]
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=n)
    opened: list[int] = []  # a function that opens the source (the job's form) is called once, at the refit

    def open_source() -> StreamedModel:
        opened.append(len(decoder_layers(c)))
        return StreamedModel(tmp_path / "src", device="cpu", dtype=torch.float32)

    c = copy.deepcopy(source)
    compress(c, ids, config, dense=open_source)
    assert opened == [4]  # after both removals
    for (n, x), y in zip(b.state_dict().items(), c.state_dict().values(), strict=True):
        assert torch.equal(x, y), n


def test_refit_needs_the_dense_model_and_is_refused_where_unsupported() -> None:
    model, ids = tiny_model("llama"), tokens(4, 8)
    with pytest.raises(PrunecompError, match="dense="):
        compress(model, ids, PruneConfig(n_layers=1, refit="sequential"))
    assert len(decoder_layers(model)) == 6  # refused before any removal
    with pytest.raises(ValidationError, match="lsq"):
        PruneConfig(n_layers=1, compensation="lsq", refit="sequential")
    with pytest.raises(ValidationError, match="refine_at='end'"):
        PruneConfig(n_layers=1, refit="sequential", refine="norms", refine_at="each")


def test_the_job_reads_the_dense_layers_from_the_source(stories_dir, tmp_path) -> None:
    """dense_layers: a safetensors source is read layer by layer (StreamedModel); any other source is loaded a
    second time, whole, with every layer."""
    import shutil

    from prunecomp.engine.dense import dense_layers
    from prunecomp.engine.streamed import StreamedModel
    from prunecomp.models.sources import load_model

    source = tiny_model("llama")
    source.save_pretrained(tmp_path / "st")
    source.save_pretrained(tmp_path / "pickle")
    for f in (tmp_path / "pickle").glob("*.safetensors"):  # a pickle checkpoint in its place
        f.unlink()
    torch.save(source.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    for folder in ("st", "pickle"):  # any tokenizer will do: the model is never run on text here
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            shutil.copy(stories_dir / name, tmp_path / folder / name)
    st = load_model(str(tmp_path / "st"))
    pk = load_model(str(tmp_path / "pickle"), allow_pickle=True)
    assert isinstance(dense_layers(st), StreamedModel)
    again = dense_layers(pk, allow_pickle=True)
    assert isinstance(again, InMemoryDense) and again.model is not pk.model
    for o in range(6):
        for (n, a), b in zip(decoder_layers(source)[o].state_dict().items(),
                             again.load_layer(o).state_dict().values(), strict=True):
            assert torch.equal(a, b), (o, n)
