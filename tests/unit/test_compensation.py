"""Exactness of compensation on a tiny random model of every supported family.

After removing layer l and folding s upstream: every hidden state upstream of the gap is s times the
uncompensated one, and the logits equal those of the uncompensated pruned model whose residual stream is multiplied
by s at run time where layer l was (RMSNorm eps is 1e-12 in these configs, so "up to eps" is float precision).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_model, tokens
from torch.testing import assert_close

from prunecomp.errors import PrunecompError
from prunecomp.method.compensation import compensate, is_tied, scale_norm_weight
from prunecomp.models.adapters import decoder_layers, get_adapter, resolve
from prunecomp.models.pruning import remove_layer


def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states, out.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_compensated_model_equals_runtime_scaling(family: str) -> None:
    gap, s = 3, 1.37
    base = tiny_model(family)
    remove_layer(base, gap)
    comp = copy.deepcopy(base)
    compensate(comp, gap, s)
    ids = tokens()
    h_base, _ = _hidden(base, ids)
    h_comp, logits_comp = _hidden(comp, ids)
    # hidden_states[i] is the residual stream entering layer i (index 0: embeddings); upstream of the gap: [0, gap]
    for i in range(gap + 1):
        scale = float(h_base[i].abs().max())  # float32 rounding grows with the stream's magnitude (Gemma: x sqrt(d))
        assert_close(h_comp[i], s * h_base[i], rtol=1e-5, atol=1e-5 * scale)
    layers = decoder_layers(base)
    handle = layers[gap].register_forward_pre_hook(
        lambda _m, args, kwargs: ((args[0] * s, *args[1:]), kwargs) if args else
        (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}), with_kwargs=True)
    try:
        _, logits_runtime = _hidden(base, ids)
    finally:
        handle.remove()
    assert_close(logits_comp, logits_runtime, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits_comp, _hidden(base, ids)[1], atol=1e-3), "compensation must change something"


@pytest.mark.parametrize("family", ["llama-tied", "qwen3", "gemma3", "llama"])
def test_scaling_every_layer_leaves_logits_unchanged(family: str) -> None:
    """Gap after the last layer: only the final norm sees s*x, so the output head is effectively unchanged,
    including with tied embeddings where the embedding table is also the head."""
    model = tiny_model(family)
    ids = tokens()
    _, before = _hidden(model, ids)
    adapter = get_adapter(model)
    compensate(model, len(decoder_layers(model)), 2.5)
    _, after = _hidden(model, ids)
    assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert is_tied(model, adapter) == model.config.tie_word_embeddings


def test_gemma_norm_offset_folding() -> None:
    w = torch.tensor([0.0, 0.5, -0.25])
    new = scale_norm_weight(w, 2.0, offset=1.0)
    assert_close(1.0 + new, 2.0 * (1.0 + w))
    assert_close(scale_norm_weight(w, 2.0), 2.0 * w)


def test_biases_are_scaled() -> None:
    model = tiny_model("llama-bias")
    o_proj = resolve(decoder_layers(model)[0], "self_attn.o_proj")
    bias = o_proj.bias.detach().clone()
    compensate(model, 1, 3.0)
    assert_close(o_proj.bias, 3.0 * bias)
    untouched = resolve(decoder_layers(model)[1], "self_attn.o_proj")
    assert_close(untouched.bias, tiny_model("llama-bias").model.layers[1].self_attn.o_proj.bias)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_rejected(bad: float) -> None:
    with pytest.raises(PrunecompError, match="finite positive"):
        compensate(tiny_model("llama"), 2, bad)
