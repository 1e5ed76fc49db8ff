"""Capabilities of the backends, declared once: every refusal to stream comes from one table."""

from __future__ import annotations

import pytest

from prunecomp.config import PruneConfig
from prunecomp.engine.backends import IN_MEMORY, STREAMED
from prunecomp.engine.stages import refusal
from prunecomp.levels import apply_level


@pytest.mark.parametrize(("fields", "needle"), [
    ({"metric": "taylor"}, "metric 'taylor'"),
    ({"compensation": "lsq"}, "the lsq gap map"),
    ({"mode": "one-shot"}, "mode 'one-shot'"),
    ({"selection": "loss"}, "selection by loss"),
    ({"refine": "channels"}, "the gains"),
    ({"refit": "sequential"}, "the sequential refit"),
])
def test_streaming_refuses_what_it_cannot_hold(fields, needle) -> None:
    why = refusal(STREAMED, PruneConfig(n_layers=2, **fields))
    assert why is not None and needle in why and why.startswith("layer streaming cannot run")
    assert refusal(IN_MEMORY, PruneConfig(n_layers=2, **fields)) is None


def test_streaming_runs_the_default_and_block_reconstruction_but_not_qa() -> None:
    assert refusal(STREAMED, PruneConfig(n_layers=2)) is None
    assert refusal(STREAMED, PruneConfig(n_layers=2, reconstruct="both")) is None
    assert "QA tasks" in (refusal(STREAMED, PruneConfig(n_layers=2), qa=True) or "")


def test_quality_levels_against_streaming() -> None:
    """fast streams; balanced and best fit the gains, which need the whole model."""
    fast, balanced, best = (apply_level(PruneConfig(n_layers=2), lv, 8)[0] for lv in ("fast", "balanced", "best"))
    assert refusal(STREAMED, fast) is None
    assert "the gains" in (refusal(STREAMED, balanced) or "") and "the gains" in (refusal(STREAMED, best) or "")
