"""Remove decoder layers so that the result is a plain, smaller HF model.

After :func:`remove_layer` the model saves with ``save_pretrained`` and reloads with
``AutoModelForCausalLM.from_pretrained``: ``layer_idx`` attributes are contiguous again (the KV cache is indexed by
them), ``num_hidden_layers`` and every per-layer list of the config (``layer_types``, ...) lose the entry, and
``config.prunecomp`` records the ORIGINAL index of each kept layer so later steps and audits speak in original
indices.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from prunecomp.errors import PrunecompError
from prunecomp.models.adapters import decoder_layers, get_adapter

__all__ = ["original_indices", "remove_layer", "skip_layer"]

# Config attributes that hold one entry per decoder layer, beyond those found by name (see _per_layer_keys).
_PER_LAYER_KEYS = {"layer_types", "no_rope_layers", "mlp_only_layers", "swa_layers"}


def original_indices(model: nn.Module) -> list[int]:
    """The original (pre-pruning) index of every current decoder layer."""
    info = getattr(model.config, "prunecomp", None)
    if isinstance(info, dict) and "kept_layers" in info:
        return [int(i) for i in info["kept_layers"]]
    return list(range(len(decoder_layers(model))))


def _drop(values: Any, index: int) -> list[Any]:
    """``values`` (one entry per decoder layer) without layer ``index``'s entry."""
    return [v for i, v in enumerate(values) if i != index]


def _per_layer_keys(config: Any, n: int) -> list[str]:
    keys = []
    for key, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == n and (key in _PER_LAYER_KEYS or "layer" in key):
            keys.append(key)
    return keys


def remove_layer(model: nn.Module, index: int) -> nn.Module:
    """Delete decoder layer ``index`` (current numbering) in place and return the removed module."""
    adapter = get_adapter(model)
    layers = decoder_layers(model, adapter)
    n = len(layers)
    if not 0 <= index < n:
        raise PrunecompError(f"layer index {index} out of range: the model has {n} decoder layers")
    if n <= 1:
        raise PrunecompError("cannot remove the only decoder layer")
    kept = original_indices(model)
    config = model.config
    for key in _per_layer_keys(config, n):
        setattr(config, key, _drop(getattr(config, key), index))
    removed = layers[index]
    del layers[index]
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config.num_hidden_layers = n - 1
    info = dict(getattr(config, "prunecomp", None) or {})
    info.setdefault("source_num_layers", n)
    info["removed_layers"] = [*info.get("removed_layers", []), kept[index]]
    del kept[index]
    info["kept_layers"] = kept
    if info.get("folded_scale"):  # per-layer record of compensation (see compensation.folded_scales)
        info["folded_scale"] = _drop(info["folded_scale"], index)
    config.prunecomp = info
    return removed


@contextmanager
def skip_layer(model: nn.Module, index: int) -> Iterator[None]:
    """Run ``model`` as if decoder layer ``index`` were removed, then put everything back.

    Exactly the state :func:`remove_layer` leaves (per-layer config entries such as Gemma's ``layer_types``, which
    pick each position's attention mask, lose the layer's entry; ``layer_idx`` is renumbered for the KV cache),
    undone on exit.
    """
    layers = decoder_layers(model)
    config = model.config
    n = len(layers)
    saved = {key: getattr(config, key) for key in _per_layer_keys(config, n)}
    saved_n = config.num_hidden_layers
    saved_info = getattr(config, "prunecomp", None)
    saved_idx = [(m, m.layer_idx) for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")]
    removed = layers[index]
    del layers[index]
    try:
        for key, value in saved.items():
            setattr(config, key, _drop(value, index))
        config.num_hidden_layers = n - 1
        if isinstance(saved_info, dict) and saved_info.get("folded_scale"):
            config.prunecomp = {**saved_info, "folded_scale": _drop(saved_info["folded_scale"], index)}
        for new_idx, layer in enumerate(layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        yield
    finally:
        layers.insert(index, removed)
        for module, idx in saved_idx:
            module.layer_idx = idx
        for key, value in saved.items():
            setattr(config, key, value)
        config.num_hidden_layers = saved_n
        if saved_info is not None:  # compensate() inside the block records its folds there
            config.prunecomp = saved_info
        elif hasattr(config, "prunecomp"):
            del config.prunecomp
