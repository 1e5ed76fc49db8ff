"""Layer-streamed pruning: same decisions and the same output model as in-memory Prune&Comp, one layer resident."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM

from prunecomp.config import PruneConfig
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.engine.streamed import StreamedModel
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.perplexity import mean_nll

CAL = tokens(n=6, t=16)


@pytest.fixture(params=["llama", "llama-tied", "llama-bias", "qwen3", "gemma3"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, str]:
    model = tiny_model(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(folder, max_shard_size="20KB")  # several shards: the index path is exercised
    return model, str(folder)


@pytest.mark.parametrize("compensation", ["magnitude", "none"])
def test_streamed_equals_in_memory(saved: tuple[torch.nn.Module, str], compensation: str, tmp_path) -> None:
    model, folder = saved
    config = PruneConfig(metric="bi", n_layers=3, compensation=compensation, scoring="exact")
    ref = copy.deepcopy(model)
    ref_report = prune_and_compensate(ref, CAL, config, batch_size=4)

    sm = StreamedModel(folder)
    report = prune_and_compensate(sm, CAL, config, batch_size=4)
    assert report.removed == ref_report.removed
    for a, b in zip(ref_report.steps, report.steps, strict=True):
        assert b.measured_scale == pytest.approx(a.measured_scale, rel=1e-5)
        assert all(b.scores[i] == pytest.approx(a.scores[i], rel=1e-4, abs=1e-7) for i in a.scores)
    # every layer loaded once per pass: 6 + 5 + 4
    assert sm.layer_loads == 15

    assert math.exp(mean_nll(ref, CAL, batch_size=4)) == pytest.approx(sm.perplexity(CAL, batch_size=4), rel=1e-5)
    # the final check's loss, streamed, is the in-memory one
    assert sm.mean_nll(CAL, batch_size=4) == pytest.approx(mean_nll(ref, CAL, batch_size=4), rel=1e-5)
    out = sm.save(str(tmp_path / "pruned"))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 3
    assert loaded.config.prunecomp["removed_layers"] == ref_report.removed
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=CAL).logits, ref(input_ids=CAL).logits, rtol=1e-5, atol=1e-5)


def test_streamed_errors(tmp_path) -> None:
    with pytest.raises(PrunecompError, match=r"config\.json"):
        StreamedModel(tmp_path)
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    sm = StreamedModel(tmp_path / "m")
    with pytest.raises(PrunecompError, match="cannot run metric 'ppl'"):
        prune_and_compensate(sm, CAL, PruneConfig(metric="ppl", n_layers=2))
    with pytest.raises(PrunecompError, match="cannot run the lsq gap map"):
        prune_and_compensate(sm, CAL, PruneConfig(n_layers=2, compensation="lsq"))
    assert sm.layer_loads == 0  # rejected before any compute
