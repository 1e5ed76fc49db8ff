"""Architectures as data: where the decoder layers, norms and residual-stream writers of each HF family live.

Prune&Comp needs four facts about a model: the list of decoder layers, the token embedding, the final norm, and
which weights *write into the residual stream* (their output is added to it). Scaling every writer upstream of a
pruned layer by ``s`` makes the residual stream reaching the gap ``s`` times larger while every pre-norm layer
computes the same thing (RMSNorm is scale invariant up to eps).

* Pre-norm families (Llama, Mistral, Qwen2, Qwen3): the writers are ``self_attn.o_proj`` and ``mlp.down_proj``
  (weight and bias).
* Sandwich-norm families (Gemma 2/3): each sub-layer output passes a *post* norm before the residual add, so the
  writers are those norms' weights; Gemma's RMSNorm multiplies by ``(1 + weight)``, hence ``norm_offset=1``.

Adding a family means adding one :class:`ArchAdapter` entry to :data:`REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from prunecomp.errors import PrunecompError

__all__ = ["REGISTRY", "ArchAdapter", "decoder_layers", "get_adapter", "resolve"]


@dataclass(frozen=True)
class ArchAdapter:
    """Attribute paths (dotted, relative to the ``*ForCausalLM`` module) of one architecture family."""

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Per-layer modules (relative to a decoder layer) whose outputs are added to the residual stream.
    # Linear modules are scaled as ``W * s`` (and their bias); norm modules as ``(offset + w) * s - offset``.
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    writers_are_norms: bool = False
    # RMSNorm multiplies by ``offset + weight`` (0 for Llama-style norms, 1 for Gemma-style norms).
    norm_offset: float = 0.0
    # The linear module (relative to a decoder layer) that writes last into the stream, where ``lsq`` folds its
    # gap map; ``None`` where the last write passes a norm (sandwich norms), so only magnitude compensation applies.
    lsq_writer: str | None = "mlp.down_proj"
    # The other linear modules of a decoder layer (relative paths). A per-channel gain on any linear's output folds
    # exactly into its weight rows (and bias), whatever follows it (RoPE, q/k norms, the MLP's activation): the
    # hooked and the folded model compute the same thing. Used by ``--refine channels``.
    inner_linears: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                      "mlp.up_proj")


_PRE_NORM = ArchAdapter()
_SANDWICH = ArchAdapter(
    residual_writers=("post_attention_layernorm", "post_feedforward_layernorm"),
    writers_are_norms=True,
    norm_offset=1.0,
    lsq_writer=None,
)

REGISTRY: dict[str, ArchAdapter] = {
    "LlamaForCausalLM": _PRE_NORM,
    "MistralForCausalLM": _PRE_NORM,
    "Qwen2ForCausalLM": _PRE_NORM,
    "Qwen3ForCausalLM": _PRE_NORM,
    "Gemma2ForCausalLM": _SANDWICH,
    "Gemma3ForCausalLM": _SANDWICH,
}


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model``'s class, or a clear error naming the supported architectures."""
    name = type(model).__name__
    adapter = REGISTRY.get(name)
    if adapter is None:
        raise PrunecompError(
            f"unsupported architecture {name!r}: prunecomp supports {', '.join(sorted(REGISTRY))}. "
            "Add an ArchAdapter entry to prunecomp.models.adapters.REGISTRY for another decoder family."
        )
    return adapter


def resolve(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path="a.b.c"``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module, adapter: ArchAdapter | None = None) -> nn.ModuleList:
    """The model's list of decoder layers."""
    layers = resolve(model, (adapter or get_adapter(model)).layers)
    assert isinstance(layers, nn.ModuleList)
    return layers
