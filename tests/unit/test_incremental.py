"""Incremental re-scoring and the layer-at-a-time machinery: same choices and scores as exact re-scoring, and only
the layers after each gap are re-run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import gemma2_model, tiny_model, tokens

from prunecomp.config import PruneConfig
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.sequential import catch_layer_inputs, head_nll, run_layer

CAL = tokens(n=6, t=16)


def _model(family: str) -> torch.nn.Module:
    return gemma2_model() if family == "gemma2" else tiny_model(family)


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen3", "gemma3", "gemma2"])
def test_layer_by_layer_forward_reproduces_the_model_loss(family: str) -> None:
    """The catch pass + per-layer kwargs (Gemma: sliding vs global masks and rotary tables) + head = model."""
    model = _model(family)
    caught = catch_layer_inputs(model, CAL, batch_size=4)
    assert [x.shape[0] for x in caught.hidden] == [4, 2]
    total, count = 0.0, 0
    for b, start in enumerate(range(0, CAL.shape[0], 4)):
        ids = CAL[start : start + 4]
        x = caught.hidden[b]
        for j, layer in enumerate(decoder_layers(model)):
            x = run_layer(layer, [x], [caught.kwargs[b][j]])[0]
        nll, n = head_nll(model, x, ids)
        total, count = total + nll, count + n
    with torch.no_grad():
        ref = model(input_ids=CAL, labels=CAL).loss
    assert total / count == pytest.approx(float(ref), rel=1e-5)


def _run(model: torch.nn.Module, scoring: str, **cfg: object) -> object:
    config = PruneConfig(n_layers=3, scoring=scoring, **cfg)  # type: ignore[arg-type]
    m = copy.deepcopy(model)
    report = prune_and_compensate(m, CAL, config, batch_size=4)
    return report, m


def _max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-9) for k in a if math.isfinite(a[k]))


@pytest.mark.parametrize(
    ("family", "metric", "compensation"),
    [
        ("llama", "bi", "magnitude"),
        ("llama", "angular", "none"),
        ("llama", "block", "magnitude"),
        ("llama", "ppl", "magnitude"),
        ("llama", "mag", "magnitude"),
        ("llama", "bi", "lsq"),
        ("llama-tied", "ppl", "magnitude"),
        ("llama-bias", "bi", "magnitude"),
        ("qwen3", "bi", "magnitude"),
        ("gemma3", "bi", "magnitude"),
        ("gemma3", "ppl", "none"),
    ],
)
def test_incremental_matches_exact(family: str, metric: str, compensation: str) -> None:
    model = _model(family)
    protect = (-1,) if metric == "mag" else None
    exact, m_exact = _run(model, "exact", metric=metric, compensation=compensation, protect=protect)
    inc, m_inc = _run(model, "incremental", metric=metric, compensation=compensation, protect=protect)
    assert inc.scoring == "incremental" and exact.scoring == "exact"
    assert inc.removed == exact.removed
    for a, b in zip(exact.steps, inc.steps, strict=True):
        assert _max_rel(a.scores, b.scores) < 1e-4
        assert b.measured_scale == pytest.approx(a.measured_scale, rel=1e-5)
    with torch.no_grad():
        la, lb = m_exact(input_ids=CAL).logits, m_inc(input_ids=CAL).logits
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


def test_incremental_reruns_only_the_layers_after_each_gap() -> None:
    model = tiny_model("llama")
    report, _ = _run(model, "incremental", metric="bi", compensation="magnitude")
    n = CAL.shape[0]
    n_layers = 6
    expected = [n * n_layers]  # step 0: one full pass
    for prev in report.steps[:-1]:  # then: the layers from the gap (current index of the removed one) on
        expected.append(n * (prev.layers_after - prev.chosen_current))
    assert [s.layer_forwards for s in report.steps] == expected
    exact, _ = _run(model, "exact", metric="bi", compensation="magnitude")
    assert sum(expected) < sum(s.layer_forwards for s in exact.steps)


def test_over_budget_cache_falls_back_to_exact_scoring() -> None:
    model = tiny_model("llama")
    report = prune_and_compensate(copy.deepcopy(model), CAL, PruneConfig(n_layers=2), batch_size=4,
                                  cache_budget_bytes=1)
    assert report.scoring == "exact"
    assert report.to_dict()["scoring"] == "exact"


def test_taylor_is_always_scored_exactly() -> None:
    report, _ = _run(tiny_model("llama"), "incremental", metric="taylor", protect=(-1,))
    assert report.scoring == "exact"


def test_half_precision_weights_keep_float32_statistics() -> None:
    """The GPU path (bf16 weights) is the CPU path: activations in the model dtype, statistics in float32."""
    model32 = tiny_model("llama")
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    r32 = prune_and_compensate(copy.deepcopy(model32), CAL, PruneConfig(n_layers=2), batch_size=4)
    r16 = prune_and_compensate(model16, CAL, PruneConfig(n_layers=2), batch_size=4)
    assert r16.scoring == "incremental"
    assert next(model16.parameters()).dtype == torch.bfloat16
    for a, b in zip(r32.steps, r16.steps, strict=True):
        assert isinstance(b.measured_scale, float) and math.isfinite(b.measured_scale)
        assert b.measured_scale == pytest.approx(a.measured_scale, rel=0.05)


def test_lsq_fold_into_the_embedding_invalidates_the_whole_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing layer 0 with ``lsq`` on an untied model folds the gap map into the embedding: every cached
    stream changed, so the next incremental scan must equal a fresh exact one (it used to keep a stale stream)."""
    from prunecomp.engine.incremental import IncrementalScanner
    from prunecomp.engine.loop import _remove
    from prunecomp.engine.memory_backend import InMemory
    from prunecomp.method.scoring import scan_layers
    from prunecomp.models.pruning import original_indices

    model = tiny_model("llama")  # untied embeddings: the embedding is the linear writer before layer 0
    cfg = PruneConfig(n_layers=1, metric="bi", compensation="lsq", protect=[])
    scanner = IncrementalScanner(model, CAL, batch_size=4)
    scan = scanner.scan("bi")
    # The fold is what this test is about: keep the map whatever the guard would have measured.
    monkeypatch.setattr(InMemory, "keep_gap_map", lambda self, current, fit, _g: True)
    backend = InMemory(model, CAL, batch_size=4, scanner=scanner)
    record = _remove(backend, cfg, scan, original_indices(model), list(range(6)), 0, 0, 0.0, fit_ids=CAL)
    assert record.gap_map is not None  # the map was fitted and folded into the embedding
    warm, fresh = scanner.scan("bi"), scan_layers(model, CAL, "bi", batch_size=4)
    for a, b in zip(warm.scores, fresh.scores, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    for a, b in zip(warm.scales, fresh.scales, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5)


def test_every_scanner_follows_one_protocol() -> None:
    """Exact, incremental and layer-streamed scanners expose the same calls (scan, removed, invalidate)."""
    from prunecomp.engine.incremental import IncrementalScanner
    from prunecomp.engine.scanners import StatelessScanner, make_scanner

    for cls in (StatelessScanner, IncrementalScanner):
        assert all(callable(getattr(cls, name, None)) for name in ("scan", "removed", "invalidate"))
    model = tiny_model("llama")
    assert isinstance(make_scanner(model, CAL, PruneConfig(n_layers=1), batch_size=4), IncrementalScanner)
    for cfg in (PruneConfig(n_layers=1, scoring="exact"), PruneConfig(n_layers=1, metric="taylor")):
        scanner = make_scanner(model, CAL, cfg, batch_size=4)
        assert isinstance(scanner, StatelessScanner) and scanner.kind == "exact"
