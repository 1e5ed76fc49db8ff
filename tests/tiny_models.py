"""Tiny random models of every supported family, built from configs (no download), for exactness tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

COMMON: dict[str, Any] = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-12,
)


def _config(family: str) -> Any:
    if family == "llama":
        return LlamaConfig(**COMMON, tie_word_embeddings=False)
    if family == "llama-tied":
        return LlamaConfig(**COMMON, tie_word_embeddings=True)
    if family == "llama-bias":
        return LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=16, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "qwen3":
        return Qwen3Config(**COMMON, head_dim=8, tie_word_embeddings=True)
    if family == "gemma3":
        return Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=8, tie_word_embeddings=True,
                                query_pre_attn_scalar=8)
    raise KeyError(family)


FAMILIES = ("llama", "llama-tied", "llama-bias", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A small random model; weights re-drawn with non-trivial norms and biases so nothing is accidentally 0/1."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def tokens(n: int = 2, t: int = 12, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def gemma2_model(seed: int = 0) -> torch.nn.Module:
    """Gemma 2 (sandwich norms, soft-capping) is registered too; built separately to keep FAMILIES short."""
    from transformers import Gemma2Config

    torch.manual_seed(seed)
    cfg = Gemma2Config(**COMMON, head_dim=8, sliding_window=8, tie_word_embeddings=True, query_pre_attn_scalar=8)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.5 + torch.rand_like(p)) if "norm" in name else p.normal_(0.0, 0.2)
    return model.eval()
