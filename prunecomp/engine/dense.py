"""The dense source's layers, read when a stage needs them: the final check's originals of rewritten layers and
the sequential refit's teacher. A safetensors source is read tensor by tensor (a refit of a large model holds one
extra layer, not a second model); any other source (GGUF, pickle) is loaded again, whole (such sources are small
enough to hold twice).

Apart from :mod:`prunecomp.models.sources` (which only loads models) because it builds on the refit's and the streamed
model's readers, which themselves load through the sources.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from prunecomp.engine.streamed import StreamedModel
from prunecomp.errors import PrunecompError
from prunecomp.method.refit import DenseLayers, InMemoryDense
from prunecomp.models.adapters import decoder_layers, get_adapter
from prunecomp.models.sources import LoadedModel, load_model

__all__ = ["DenseSource", "as_dense", "dense_from_folder", "dense_layers", "folder_layer_weights",
           "source_layer_weights"]


def source_layer_weights(lm: LoadedModel, layers: dict[int, int], *, allow_pickle: bool = False,
                         trust_remote_code: bool = False) -> dict[int, dict[str, Any]]:
    """The source's parameters of decoder layers ``layers`` (pruned index -> ORIGINAL index), by name inside the
    layer, keyed by the pruned index: what the final check swaps in for layers that block reconstruction rewrote.

    Read tensor by tensor from a safetensors source; any other source (GGUF, pickle) is loaded again, whole, and
    only those layers are kept (such sources are small enough to hold in memory)."""
    adapter = get_adapter(lm.model)
    if not lm.source.gguf_file and any(lm.source.local_dir.glob("*.safetensors")):
        return folder_layer_weights(lm.source.local_dir, adapter.layers, layers)
    again = load_model(lm.source.uri, lm.source.revision, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, device="cpu", known_hash=lm.content_hash)
    source_layers = decoder_layers(again.model)
    return {j: {n: p.detach().clone() for n, p in source_layers[o].named_parameters()} for j, o in layers.items()}


def dense_layers(lm: LoadedModel, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Any:
    """The dense source, layer by layer (:class:`prunecomp.method.refit.DenseLayers`), for the sequential refit: a
    safetensors source read one layer at a time (:func:`dense_from_folder`, so a refit of a large
    model holds one extra layer, not a second model); any other source (GGUF, pickle) is loaded again, whole (such
    sources are small enough to hold twice). Call it when the refit runs, not before the pruning: what it opens is
    held until it is dropped."""
    if not lm.source.gguf_file and any(lm.source.local_dir.glob("*.safetensors")):
        return dense_from_folder(lm.source.local_dir, lm.model)
    param = next(lm.model.parameters())
    again = load_model(lm.source.uri, lm.source.revision, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, dtype=param.dtype, device=str(param.device),
                       known_hash=lm.content_hash)
    return InMemoryDense(again.model)


def folder_layer_weights(folder: Path, layers_path: str, layers: dict[int, int]) -> dict[int, dict[str, Any]]:
    """:func:`source_layer_weights` from a safetensors folder (``layers_path``: the adapter's, e.g.
    ``model.layers``), tensor by tensor."""
    from prunecomp.models.tensorfiles import SafetensorsWeights

    weights = SafetensorsWeights(folder)
    return {j: weights.with_prefix(f"{layers_path}.{o}.") for j, o in layers.items()}


def dense_from_folder(folder: Path, like: nn.Module) -> DenseLayers:
    """The dense source of a safetensors folder, read one layer at a time in ``like``'s dtype and on its device
    (:class:`prunecomp.engine.streamed.StreamedModel`): what a refit of a large model needs beside it."""
    param = next(like.parameters())
    return StreamedModel(folder, dtype=param.dtype, device=str(param.device))


DenseSource = DenseLayers | nn.Module | Callable[[], DenseLayers | nn.Module]
"""The dense source of a refit: its layers (:class:`~prunecomp.method.refit.DenseLayers`), the dense model in memory,
or a function that opens one of them (called when the refit runs, so nothing is held while the layers are pruned)."""

_NO_DENSE = ("refit='sequential' fits to the dense model's streams: pass dense= (the dense model, a "
             "prunecomp.engine.streamed.StreamedModel of its folder, or a function returning one)")


def as_dense(dense: DenseSource | None) -> DenseLayers:
    if dense is None:
        raise PrunecompError(_NO_DENSE)
    if isinstance(dense, nn.Module):
        return InMemoryDense(dense)
    if hasattr(dense, "load_layer"):
        return dense  # type: ignore[return-value]
    return as_dense(dense())  # type: ignore[operator]
