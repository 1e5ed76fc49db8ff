"""bench/quality.py's levels mode measures every k from one run to the largest k; that is only valid if the state
it evaluates at a smaller k is exactly what the product produces when asked for that k. Checked on a tiny random
model for the levels that fit (gains at the end; block reconstruction after every removal plus the gains)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from prunecomp.engine.compress import compress, teacher_for
from prunecomp.evaluation.cache import weights_digest
from tests.tiny_models import tiny_model, tokens

ROOT = Path(__file__).resolve().parents[2]


class Digests:
    """Stands in for the benchmark's evaluator: records the weights it is shown instead of measuring them."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def at(self, k: int) -> bool:
        return False

    def __call__(self, model: Any, qa: bool = True, agree: bool = False) -> dict[str, Any]:
        self.seen.append(weights_digest(model))
        return {"ppl": {"mean": 1.0}, "agree": {"rate": 1.0}, "digest": self.seen[-1]}


@pytest.mark.parametrize("level", ["balanced", "best"])
def test_each_k_of_one_run_is_the_product_run_with_that_k(quality: Any, level: str) -> None:
    torch.manual_seed(0)
    model = tiny_model("llama")
    cal, fit = tokens(4, 12), tokens(64, 12, seed=2)
    ks = [1, 2]
    config = quality._level_config(level, max(ks), 4).model_copy(update={"refine_steps": 5,
                                                                          "reconstruct_steps": 5})
    targets = teacher_for(model, fit, config)
    check = tokens(2, 12, seed=3)  # the gains' held-out decision windows, as the product passes them
    runs = quality._level_run(model, cal, config, fit, targets, 0.0, ks, Digests(), 4, level, check)
    assert sorted(runs) == ks
    for k in ks:
        alone = copy.deepcopy(model)
        report = compress(alone, cal, config.model_copy(update={"n_layers": k}), refine_windows=fit,
                          check_windows=check)
        assert runs[k]["digest"] == weights_digest(alone), f"{level} at k = {k} differs from the run with k = {k}"
        assert runs[k]["removed"] == sorted(report.removed)
        assert runs[k]["seconds"] >= runs[k]["prune_seconds"] > 0 and runs[k]["refine_seconds"] > 0
    assert runs[1]["prune_seconds"] < runs[2]["prune_seconds"]


@pytest.mark.parametrize("anchor", ["replaceme", "linearpatch", "ghosted"])
def test_anchors_run_on_the_levels_table_at_every_k_with_their_seconds(quality: Any, anchor: str) -> None:
    """``--levels best,ghosted,...``: a published method beside the levels, each k from the dense model, timed."""
    model = tiny_model("llama")
    from prunecomp.corpora.calibration import TokenWindows

    cal = TokenWindows(ids=tokens(4, 12), origin="tiny", digest="d")
    runs = quality._anchor(model, cal, [1, 2], anchor, Digests(), 2, agree=True)
    assert sorted(runs) == [1, 2] and all(len(runs[k]["removed"]) == k and runs[k]["seconds"] > 0 for k in runs)
    assert quality.ANCHOR_LABELS[anchor] != anchor
