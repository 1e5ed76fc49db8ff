"""scan_layers (the hooked calibration pass) against independent computations on a tiny model."""

from __future__ import annotations

import copy

import torch
from tiny_models import gemma2_model, tiny_model, tokens
from torch.testing import assert_close

from prunecomp import metrics as M
from prunecomp.adapters import decoder_layers
from prunecomp.compensation import compensate
from prunecomp.pruning import remove_layer
from prunecomp.scoring import scan_layers

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
