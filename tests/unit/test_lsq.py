"""The least-squares gap map (compensation="lsq"): math against closed forms, exact folding, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model, tokens
from torch.testing import assert_close

from prunecomp.config import PruneConfig
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.method import fitting as F
from prunecomp.method.compensation import compensate
from prunecomp.method.lsq import apply_gap_map, fit_gap_map
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import remove_layer

GEN = torch.Generator().manual_seed(0)


def test_ridge_zero_recovers_the_true_map_and_errors_match() -> None:
    m = torch.randn(200, 6, generator=GEN, dtype=torch.float64)
    t0 = torch.randn(6, 6, generator=GEN, dtype=torch.float64)
    y = m @ t0 + 0.01 * torch.randn(200, 6, generator=GEN, dtype=torch.float64)
    state = None
    for lo in range(0, 200, 50):
        state = F.accumulate_normal_equations(state, m[lo : lo + 50], y[lo : lo + 50])
    t = F.solve_ridge(state, ridge=0.0)
    assert_close(t, torch.linalg.lstsq(m, y).solution)
    assert abs(F.lsq_error(state, t) - float(((m @ t - y) ** 2).sum())) < 1e-6
    eye = torch.eye(6, dtype=torch.float64)
    assert F.lsq_error(state, t) < F.lsq_error(state, eye)


def test_large_ridge_shrinks_to_identity() -> None:
    m = torch.randn(50, 4, generator=GEN)
    state = F.accumulate_normal_equations(None, m, 3 * m)
    assert_close(F.solve_ridge(state, ridge=1e9), torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_target_is_identity_when_the_layer_is_a_pure_scale() -> None:
    m, x_in = torch.randn(3, 4, generator=GEN), torch.randn(3, 4, generator=GEN)
    assert_close(F.lsq_target(m, x_in, 1.5 * x_in, 1.5), m.double())


def test_fold_output_map_equals_linear_then_map() -> None:
    lin = torch.nn.Linear(5, 4)
    t = torch.randn(4, 4, generator=GEN)
    x = torch.randn(7, 5, generator=GEN)
    w, b = F.fold_output_map(lin.weight.data, lin.bias.data, t)
    assert_close(x @ w.T + b, lin(x).detach() @ t, rtol=1e-5, atol=1e-5)


def test_folded_model_equals_runtime_map_on_the_writer() -> None:
    model = tiny_model("llama-bias")
    ids = tokens(n=4, t=10)
    fit = fit_gap_map(model, ids, 3, 1.2, batch_size=2)
    assert fit is not None and fit.error_after <= fit.error_before
    runtime = copy.deepcopy(model)
    apply_gap_map(model, 3, fit)
    writer = decoder_layers(runtime)[2].mlp.down_proj
    handle = writer.register_forward_hook(lambda _m, _a, out: (out.double() @ fit.t).float())
    with torch.no_grad():
        expected = runtime(ids).logits
        got = model(ids).logits
    handle.remove()
    assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_lsq_loop_lowers_gap_error_and_falls_back_for_sandwich_norms() -> None:
    cal = tokens(n=4, t=16)
    model = tiny_model("qwen3")
    report = prune_and_compensate(model, cal, PruneConfig(n_layers=2, compensation="lsq"), batch_size=2)
    kept = 0
    for step in report.steps:
        assert step.guard is not None and step.applied_scale == step.guard["scale"]  # lsq is guarded
        assert (step.gap_fit is not None) == step.guard["map_kept"]
        if step.gap_fit is not None:
            kept += 1
            assert step.gap_fit["error_after"] <= step.gap_fit["error_before"]
            assert step.guard["map_loss"] < step.guard["losses"][step.guard["scales"].index(step.applied_scale)]
    assert kept, "a map this test relies on was kept"
    gemma = tiny_model("gemma3")
    report = prune_and_compensate(gemma, cal, PruneConfig(n_layers=1, compensation="lsq"), batch_size=2)
    assert report.steps[0].gap_fit is None and report.steps[0].guard.get("map_kept") is None


def test_first_layer_with_tied_embeddings_falls_back_to_magnitude() -> None:
    model = tiny_model("llama-tied")
    assert fit_gap_map(model, tokens(), 0, 1.1) is None
    untied = tiny_model("llama")
    fit = fit_gap_map(untied, tokens(n=4, t=10), 0, 1.1)
    assert fit is not None and fit.t.shape == (32, 32)


def test_bad_ridge_rejected() -> None:
    with pytest.raises(ValueError):
        PruneConfig(n_layers=1, compensation="lsq", lsq_ridge=-1.0)


def test_trial_removal_restores_the_model_exactly() -> None:
    from prunecomp.method.selection import trial_removal

    model = tiny_model("llama")
    ids = tokens(n=4, t=10)
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PruneConfig(n_layers=1, compensation="lsq")
    with trial_removal(model, 2, cfg, 1.3, ids, 2):
        assert len(decoder_layers(model)) == 5
        with torch.no_grad():
            during = model(ids).logits
    assert len(decoder_layers(model)) == 6
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # the trial is exactly what a real removal with the same scale gives
    real = copy.deepcopy(model)
    fit = fit_gap_map(real, ids, 2, 1.3, batch_size=2)
    remove_layer(real, 2)
    compensate(real, 2, 1.3)
    apply_gap_map(real, 2, fit)
    with torch.no_grad():
        assert_close(real(ids).logits, during, rtol=1e-5, atol=1e-5)


def test_loss_selection_picks_the_lowest_compensated_loss() -> None:
    cal = tokens(n=4, t=16)
    model = tiny_model("qwen3")
    cfg = PruneConfig(n_layers=2, compensation="lsq", selection="loss", selection_pool=3)
    report = prune_and_compensate(model, cal, cfg, batch_size=2)
    for step in report.steps:
        assert step.selection_losses is not None and len(step.selection_losses) == 3
        assert step.chosen == min(step.selection_losses, key=step.selection_losses.get)
        pool = sorted(step.candidates, key=lambda c: (step.scores[c], c))[:3]
        assert sorted(step.selection_losses) == sorted(pool)
