"""scan_layers (the hooked calibration pass) against independent computations on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import gemma2_model, tiny_model, tokens
from torch.testing import assert_close

from prunecomp.config import PruneConfig
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.method import metrics as M
from prunecomp.method.compensation import compensate
from prunecomp.method.scoring import scan_layers
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import remove_layer

IDS = tokens(n=4, t=10)


def _streams(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """hidden_states[i] = input of layer i; the last one is after the final norm, so rebuild the last output."""
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def test_bi_angular_block_and_scale_match_hidden_states() -> None:
    model = tiny_model("llama")
    hs = _streams(model)
    n = len(decoder_layers(model))
    bi = scan_layers(model, IDS, "bi", batch_size=3)
    ang = scan_layers(model, IDS, "angular", batch_size=3)
    blk = scan_layers(model, IDS, "block", batch_size=3, block_size=2)
    for i in range(n - 1):  # the last layer's output is normed in hidden_states; check layers with raw outputs
        x_in, x_out = hs[i], hs[i + 1]
        cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
        assert abs(bi.scores[i] - float((1 - cos).mean())) < 1e-5
        assert abs(ang.scores[i] - float((torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean())) < 1e-5
        expected_s = float((x_out.abs().mean(1) / x_in.abs().mean(1)).mean())
        assert abs(bi.scales[i] - expected_s) < 1e-5
        if i + 2 < n:
            cos2 = torch.nn.functional.cosine_similarity(hs[i], hs[i + 2], dim=-1)
            assert abs(blk.scores[i] - float((1 - cos2).mean())) < 1e-5
    assert blk.scores[n - 1] == float("inf"), "a block running past the last layer cannot be chosen"


def test_ppl_on_skip_equals_perplexity_of_model_without_the_layer() -> None:
    model = tiny_model("qwen2")
    scan = scan_layers(model, IDS, "ppl", batch_size=2, candidates=[1, 3])
    assert scan.scores[0] == float("inf") and scan.scores[2] == float("inf")
    for i in (1, 3):
        pruned = copy.deepcopy(model)
        remove_layer(pruned, i)
        with torch.no_grad():
            loss = pruned(IDS, labels=IDS, use_cache=False).loss
        assert abs(scan.scores[i] - float(torch.exp(loss))) < 1e-3 * scan.scores[i]


def test_taylor_and_mag_scores_match_manual_gradients() -> None:
    model = tiny_model("llama")
    scan = scan_layers(model, IDS, "taylor", batch_size=4)  # one batch: grads of one mean loss
    ref = copy.deepcopy(model)
    ref(IDS, labels=IDS, use_cache=False).loss.backward()
    for i, layer in enumerate(decoder_layers(ref)):
        expected = M.taylor_importance((p, p.grad) for p in layer.parameters())
        assert abs(scan.scores[i] - expected) < 1e-4 * expected
    assert all(p.grad is None and p.requires_grad for p in model.parameters()), "scan must leave no grads behind"
    mag = scan_layers(model, IDS, "mag")
    expected = sum(float(p.detach().abs().sum()) for p in decoder_layers(model)[2].parameters() if p.ndim >= 2)
    assert abs(mag.scores[2] - expected) < 1e-3


def test_gemma2_is_supported_and_compensates_exactly() -> None:
    base = gemma2_model()
    remove_layer(base, 2)
    comp = copy.deepcopy(base)
    compensate(comp, 2, 1.5)
    with torch.no_grad():
        h_base = base(IDS, output_hidden_states=True).hidden_states
        h_comp = comp(IDS, output_hidden_states=True).hidden_states
    for i in range(3):
        assert_close(h_comp[i], 1.5 * h_base[i], rtol=1e-5, atol=1e-5 * float(h_base[i].abs().max()))


def test_mag_scores_ignore_compensation_folds() -> None:
    """Compensation rescales upstream writers without changing what those layers compute: Mag+ divides the fold
    back out, so its scores after remove + compensate are those of the same layers before."""
    model = tiny_model("llama")
    before = scan_layers(model, IDS, "mag").scores
    remove_layer(model, 3)
    compensate(model, 3, 1.9)
    compensate(model, 2, 0.7)
    n = len(decoder_layers(model))
    expected = [1.9 * 0.7, 1.9 * 0.7, 1.9] + [1.0] * (n - 3)
    assert model.config.prunecomp["folded_scale"] == pytest.approx(expected)
    after = scan_layers(model, IDS, "mag").scores
    assert after == pytest.approx(before[:3] + before[4:], rel=1e-6)
    raw = [M.magnitude_importance(p for p in layer.parameters() if p.ndim >= 2) for layer in decoder_layers(model)]
    assert raw[2] > after[2] * 1.05, "the folds must have changed the raw magnitudes this test relies on"
    remove_layer(model, 0)
    assert model.config.prunecomp["folded_scale"] == pytest.approx(expected[1:])
    assert scan_layers(model, IDS, "mag").scores == pytest.approx(before[1:3] + before[4:], rel=1e-6)


def test_mag_prune_and_comp_removes_what_uncompensated_mag_removes() -> None:
    """Mag+ only looks at weights, so with folds divided out compensation cannot steer it to other layers."""
    removed = {}
    for comp in ("none", "magnitude"):
        model = tiny_model("llama")
        report = prune_and_compensate(model, IDS, PruneConfig(metric="mag", n_layers=4, compensation=comp, protect=()))
        removed[comp] = report.removed
        if comp == "magnitude":
            assert all(abs(s.applied_scale - 1) > 0.05 for s in report.steps), "folds this test relies on"
            assert len(model.config.prunecomp["folded_scale"]) == 2
    assert removed["magnitude"] == removed["none"]


def test_trial_removal_leaves_no_fold_record() -> None:
    """Compensation-aware selection folds s on trial; the record of folds must be restored with the weights."""
    from prunecomp.method.selection import trial_removal

    model = tiny_model("llama")
    compensate(model, 2, 1.3)
    record = dict(model.config.prunecomp)
    with trial_removal(model, 3, PruneConfig(metric="bi", n_layers=1, compensation="magnitude"), 1.7, IDS, 4):
        assert model.config.prunecomp["folded_scale"][0] == pytest.approx(1.3 * 1.7)
    assert model.config.prunecomp == record


def test_trial_on_a_fresh_model_leaves_no_record() -> None:
    from prunecomp.method.selection import trial_removal

    model = tiny_model("llama")
    with trial_removal(model, 3, PruneConfig(metric="bi", n_layers=1, compensation="magnitude"), 1.7, IDS, 4):
        assert "folded_scale" in model.config.prunecomp
    assert getattr(model.config, "prunecomp", None) is None
