"""The prune_and_compensate loop: counts, original indices, protection, modes, metrics and early errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tokens

from prunecomp.config import PruneConfig
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.errors import PrunecompError
from prunecomp.method.scoring import METRICS, scan_layers
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import original_indices


def _identity(model: torch.nn.Module, index: int) -> None:
    """Make layer ``index`` an exact identity on the residual stream (both writers zero)."""
    layer = decoder_layers(model)[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


CAL = tokens(n=4, t=16)


def test_bi_picks_identity_layer_with_zero_score_and_unit_scale() -> None:
    model = tiny_model("llama")
    _identity(model, 2)
    scan = scan_layers(model, CAL, "bi", batch_size=2)
    assert scan.scores[2] == pytest.approx(0.0, abs=1e-6)
    assert scan.scales[2] == pytest.approx(1.0, abs=1e-6)
    assert min(range(6), key=lambda i: scan.scores[i]) == 2
    assert all(s > 1e-4 for i, s in enumerate(scan.scores) if i != 2)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["iterative", "one-shot"])
def test_every_metric_and_mode_removes_k_layers(metric: str, mode: str) -> None:
    model = tiny_model("qwen3")
    steps = []
    cfg = PruneConfig(metric=metric, n_layers=2, mode=mode, protect=(-1,))
    report = prune_and_compensate(model, CAL, cfg, batch_size=2, on_step=lambda r, m: steps.append(r.chosen))
    assert len(decoder_layers(model)) == 4
    assert report.removed == steps
    assert len(set(report.removed)) == 2 and 5 not in report.removed
    assert sorted(original_indices(model) + report.removed) == list(range(6))
    for step in report.steps:
        assert step.chosen in step.candidates
        assert step.measured_scale > 0 and step.guard is not None  # guarded: the default
        assert step.guard["scales"][step.guard["exponents"].index(1.0)] == step.measured_scale
        assert step.applied_scale == step.guard["scale"] in step.guard["scales"]
    first = report.steps[0]
    if mode == "iterative" and metric != "block":
        for step in report.steps:
            assert step.scores[step.chosen] == min(step.scores[c] for c in step.candidates)
    elif metric != "block":  # one-shot: the k lowest of the single scan
        lowest = sorted(first.candidates, key=lambda c: (first.scores[c], c))[:2]
        assert sorted(report.removed) == sorted(lowest)
        assert report.removed == sorted(lowest, reverse=True), "one-shot removes from the highest index down"
    if metric == "block":
        assert abs(report.removed[0] - report.removed[1]) == 1, "block removes a contiguous pair"


def test_iterative_rescoring_uses_original_indices() -> None:
    model = tiny_model("llama")
    _identity(model, 3)
    _identity(model, 1)
    report = prune_and_compensate(model, CAL, PruneConfig(n_layers=2), batch_size=2)
    assert sorted(report.removed) == [1, 3]
    second = report.steps[1]
    assert set(second.scores) == set(range(6)) - {report.removed[0]}, "scores keyed by original index"
    assert second.chosen_current == (1 if second.chosen == 1 else 2)


def test_no_compensation_applies_scale_one() -> None:
    model = tiny_model("llama")
    emb = model.model.embed_tokens.weight.detach().clone()
    report = prune_and_compensate(model, CAL, PruneConfig(n_layers=1, compensation="none"), batch_size=2)
    assert report.steps[0].applied_scale == 1.0
    assert torch.equal(model.model.embed_tokens.weight, emb)


def test_fraction_and_protection() -> None:
    model = tiny_model("llama")
    report = prune_and_compensate(model, CAL, PruneConfig(fraction=0.5, protect=(0, 1, -1)), batch_size=2)
    assert sorted(report.removed) == [2, 3, 4]


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (PruneConfig(n_layers=6), "between 1 and 5"),
        (PruneConfig(n_layers=5, protect=(0, -1)), "leave 4 removable layers"),
        (PruneConfig(n_layers=1, protect=(7,)), "out of range"),
        (PruneConfig(), "say how many layers"),
    ],
)
def test_bad_configs_fail_before_any_work(cfg: PruneConfig, match: str) -> None:
    model = tiny_model("llama")
    with pytest.raises(PrunecompError, match=match):
        prune_and_compensate(model, CAL, cfg)
    assert len(decoder_layers(model)) == 6


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="not both"):
        PruneConfig(n_layers=2, fraction=0.5)
    with pytest.raises(ValueError):
        PruneConfig(n_layers=0)
    with pytest.raises(ValueError):
        PruneConfig(metric="nope")
    with pytest.raises(ValueError):
        PruneConfig(n_layers=1, typo=True)
