"""Removing layers yields a plain HF model: contiguous layer_idx, consistent config, same logits after reload,
working KV-cache generation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model, tokens
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from prunecomp.errors import PrunecompError
from prunecomp.method.compensation import compensate
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import original_indices, remove_layer
from prunecomp.recipes.checkpoint import save_pruned


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_save_reload_same_logits(family: str, tmp_path) -> None:
    model = tiny_model(family)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    remove_layer(model, 4)
    remove_layer(model, 1)
    compensate(model, 1, 1.3)
    layers = decoder_layers(model)
    assert len(layers) == 4 == model.config.num_hidden_layers
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    assert original_indices(model) == [0, 2, 3, 5]
    assert model.config.prunecomp["removed_layers"] == [4, 1]
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in (0, 2, 3, 5)]
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    save_pruned(model, None, str(tmp_path / "m"))
    assert not list(tmp_path.glob(".m.tmp-*")), "temp folder must be renamed away"
    assert (tmp_path / "m" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.config.num_hidden_layers == 4
    with torch.no_grad():
        assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert original_indices(reloaded) == [0, 2, 3, 5]


@pytest.mark.parametrize("family", ["llama-tied", "gemma3", "qwen2"])
def test_kv_cache_generation_after_pruning(family: str) -> None:
    model = tiny_model(family)
    remove_layer(model, 2)
    remove_layer(model, 0)
    ids = tokens(n=1, t=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (1, 11)
    assert torch.equal(with_cache, without)


def test_remove_layer_rejects_bad_index() -> None:
    model = tiny_model("llama")
    with pytest.raises(PrunecompError, match="out of range"):
        remove_layer(model, 6)
    with pytest.raises(PrunecompError, match="out of range"):
        remove_layer(model, -1)
