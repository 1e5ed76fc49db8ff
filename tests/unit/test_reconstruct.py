"""Block reconstruction (``reconstruct``): the loss against its formula, the streams it reads against a plain
forward, the fit touching only the layers beside the gap, bit-for-bit recipe replay on a tiny model of every
family, and the final check's view of a reconstructed model against the plainly pruned one."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from prunecomp.config import PruneConfig
from prunecomp.engine.final_check import final_check, reconstructed_layers, uncompensated_view
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.errors import PrunecompError
from prunecomp.method.reconstruct import capture_gap, effective_side, fit_layers, reconstruct, relative_error
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import remove_layer
from prunecomp.recipes.recipe import FORMAT_LAYERS, Recipe
from tests.layer_checks import replays_and_views
from tests.tiny_models import FAMILIES, tiny_model, tokens

SOURCE = {"content_hash": "tiny", "architecture": "LlamaForCausalLM"}


def test_relative_error_matches_the_formula_and_skips_position_0() -> None:
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    want = sum(float(((h[b, t] - y[b, t]) ** 2).sum()) for b in range(2) for t in range(1, 5)) / \
        sum(float((y[b, t] ** 2).sum()) for b in range(2) for t in range(1, 5))
    assert float(relative_error(h, y)) == pytest.approx(want, rel=1e-6)
    h2 = h.clone()
    h2[:, 0] += 1e6  # the attention sink is not part of the loss
    assert float(relative_error(h2, y)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("side", ["before", "after", "both"])
def test_capture_gap_reads_the_streams_of_a_plain_forward(side: str) -> None:
    model, ids = tiny_model("llama"), tokens(4, 12)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # hs[j]: entering layer j
    gap = capture_gap(model, 3, ids, side, batch_size=2)
    assert gap is not None
    first, target_out = {"before": (2, 4), "after": (3, 5), "both": (2, 5)}[side]
    torch.testing.assert_close(torch.cat(gap.xs), hs[first], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat(gap.ys), hs[target_out], rtol=0, atol=1e-6)
    assert gap.fitted() == {"before": [2], "after": [3], "both": [2, 3]}[side]


def test_a_missing_neighbour_falls_back_to_the_other_side() -> None:
    model, ids = tiny_model("llama"), tokens(2, 8)
    for current, side, used in ((0, "before", "after"), (0, "both", "after"), (5, "after", "before"),
                                (5, "both", "before"), (0, "after", "after"), (3, "both", "both")):
        gap = capture_gap(model, current, ids, side)
        assert gap is not None and gap.side == used, (current, side)
    assert effective_side("both", 0, 1) is None


def test_the_fit_lowers_the_error_and_touches_only_the_fitted_layer() -> None:
    model, ids = tiny_model("qwen3"), tokens(8, 16)
    gap = capture_gap(model, 3, ids, "after", batch_size=2)
    assert gap is not None
    remove_layer(model, 3)
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers.3." not in n}
    flags = [p.requires_grad for p in model.parameters()]
    done = reconstruct(model, gap, 1.0, steps=30, lr=1e-2, seed=0, removed=3, originals=[0, 1, 2, 4, 5])
    assert done.layers == [4] and done.target == 4 and done.windows == 8
    assert done.loss_after < 0.8 * done.loss_before
    for n, p in model.named_parameters():
        if n in untouched:
            assert torch.equal(p, untouched[n]), n
    assert [p.requires_grad for p in model.parameters()] == flags  # the fit trains copies


def test_a_fit_that_does_not_lower_the_error_is_declined() -> None:
    model, ids = tiny_model("llama"), tokens(4, 8)
    gap = capture_gap(model, 2, ids, "before", batch_size=2)
    assert gap is not None
    remove_layer(model, 2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    done = reconstruct(model, gap, 1.0, steps=3, lr=50.0, seed=0, removed=2, originals=[0, 1, 3, 4, 5])
    assert not done.kept and done.loss_after == done.loss_before
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    report = prune_and_compensate(tiny_model("llama"), ids, PruneConfig(n_layers=1, reconstruct="before",
                                                                        reconstruct_steps=3, reconstruct_lr=50.0))
    step = report.steps[0]
    assert step.reconstruct is not None and not step.reconstruct["kept"] and step.layer_weights is None
    assert report.recipe(SOURCE).steps[0].layers is None


def test_fit_layers_keeps_a_low_precision_layer_in_its_dtype() -> None:
    model, ids = tiny_model("llama"), tokens(4, 8)
    gap = capture_gap(model, 2, ids, "before", batch_size=2)
    assert gap is not None
    layer = decoder_layers(model)[1].to(torch.bfloat16)
    before, after = fit_layers([layer], gap.xs, gap.ys, gap.kwargs, steps=5, lr=1e-2,
                               generator=torch.Generator().manual_seed(0))[:2]
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert after < before


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["before", "after", "both"])
def test_recipe_replays_bit_for_bit_and_the_view_is_the_plain_removal(family: str, side: str, tmp_path) -> None:
    source, ids = tiny_model(family), tokens(8, 16)
    model = copy.deepcopy(source)
    report = prune_and_compensate(model, ids, PruneConfig(n_layers=2, reconstruct=side, reconstruct_steps=10,
                                                          reconstruct_batch=2))
    assert all(s.reconstruct is not None and s.layer_weights for s in report.steps)
    assert all(s.reconstruct["loss_after"] < s.reconstruct["loss_before"] for s in report.steps)  # type: ignore[index]
    assert "layer_weights" not in report.steps[0].to_dict()
    recipe = report.recipe(SOURCE | {"architecture": type(model).__name__})
    originals = replays_and_views(source, model, recipe, ids, tmp_path)
    assert f'"{FORMAT_LAYERS}"' in (tmp_path / "recipe.json").read_text()
    rewritten = reconstructed_layers(recipe, 4)
    assert set(rewritten.values()) <= set(range(6)) - set(report.removed) and rewritten
    with pytest.raises(ValueError, match="reconstructed"), uncompensated_view(model, recipe):
        pass
    check = final_check(model, recipe, ids, "d", originals=originals)
    assert "reconstruct" in check.folded


def test_reconstruct_is_refused_with_lsq() -> None:
    with pytest.raises(ValidationError, match="lsq"):
        PruneConfig(n_layers=1, compensation="lsq", reconstruct="after")


def test_a_json_report_of_a_reconstructed_run_is_not_a_recipe() -> None:
    from prunecomp.recipes.recipe import recipe_from_report

    model, ids = tiny_model("llama"), tokens(4, 8)
    report = prune_and_compensate(model, ids, PruneConfig(n_layers=1, reconstruct="after", reconstruct_steps=2))
    with pytest.raises(PrunecompError, match="reconstructed layers"):
        recipe_from_report(report.to_dict() | {"source_num_layers": 6})
    assert isinstance(report.recipe(SOURCE), Recipe)


def test_fits_use_tf32_only_on_cuda_and_restore_the_flags() -> None:
    """The float32 fits run their matmuls in TF32 on CUDA (the flags set inside, restored after, even on an
    error); elsewhere the flags are not touched."""
    from prunecomp.method.reconstruct import tf32_matmuls

    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with tf32_matmuls(torch.device("cpu")):
            assert not torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError), tf32_matmuls(torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise RuntimeError("a failing fit")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_capture_gap_reads_the_held_out_streams_in_the_same_pass() -> None:
    model, ids, held = tiny_model("llama"), tokens(4, 12), tokens(2, 12, seed=5)
    gap = capture_gap(model, 3, ids, "both", batch_size=2, check=held)
    alone = capture_gap(model, 3, held, "both", batch_size=2)
    plain = capture_gap(model, 3, ids, "both", batch_size=2)
    assert gap is not None and alone is not None and plain is not None and gap.check is not None
    for mine, want in ((gap.check.xs, alone.xs), (gap.check.ys, alone.ys), (gap.xs, plain.xs), (gap.ys, plain.ys)):
        assert all(torch.equal(a, b) for a, b in zip(mine, want, strict=True))
    assert plain.check is None


def test_a_fit_that_lowers_its_own_error_but_not_the_held_out_one_is_declined() -> None:
    """The held-out target is what the layer writes today (error 0 before the fit): any fit raises it, so a fit
    that lowers the fitting windows' error is declined and the layer is left as it was."""
    from prunecomp.method.reconstruct import HeldOut, describe
    from prunecomp.models.sequential import run_layer

    model, ids, held = tiny_model("qwen3"), tokens(8, 16), tokens(4, 16, seed=7)
    gap = capture_gap(model, 3, ids, "after", batch_size=2, check=held)
    assert gap is not None and gap.check is not None
    remove_layer(model, 3)
    layer = decoder_layers(model)[3]
    with torch.no_grad():
        today = run_layer(layer, gap.check.xs, [kw[0] for kw in gap.check.kwargs])
    gap.check = HeldOut(xs=gap.check.xs, ys=today, kwargs=gap.check.kwargs)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    done = reconstruct(model, gap, 1.0, steps=30, lr=1e-2, seed=0, removed=3, originals=[0, 1, 2, 4, 5])
    assert done.loss_after < 0.8 * done.loss_before  # it did fit its windows
    assert done.check_windows == 4 and done.check_loss_before == pytest.approx(0.0, abs=1e-10)
    assert done.check_loss_after is not None and done.check_loss_after > 0 and not done.kept
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert "not on 4 held-out windows" in describe(done.to_dict())


def test_a_kept_held_out_fit_is_the_unchecked_fit_bit_for_bit() -> None:
    ids, held = tokens(8, 16), tokens(4, 16, seed=7)
    config = PruneConfig(n_layers=2, reconstruct="both", reconstruct_steps=20, reconstruct_lr=1e-2)
    checked, plain = tiny_model("llama"), tiny_model("llama")
    a = prune_and_compensate(checked, ids, config, check_windows=held)
    b = prune_and_compensate(plain, ids, config)
    assert a.removed == b.removed
    for sa, sb in zip(a.steps, b.steps, strict=True):
        assert sa.reconstruct is not None and sb.reconstruct is not None
        assert sa.reconstruct["kept"] and sa.reconstruct["check_windows"] == 4 and sb.reconstruct["check_windows"] == 0
        assert sa.reconstruct["check_loss_after"] < sa.reconstruct["check_loss_before"]
        assert sa.reconstruct["loss_after"] == sb.reconstruct["loss_after"]
    assert all(torch.equal(p, q) for p, q in zip(checked.state_dict().values(), plain.state_dict().values(),
                                                  strict=True))
