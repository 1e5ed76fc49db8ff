"""Sequential layer-wise refit after the last removal (``refit="sequential"``): refit every layer from the first
gap on, in order, so that fed the pruned model's own stream (through the layers already refitted) each writes the
DENSE model's stream after the same original layer.

Why: block reconstruction (:mod:`prunecomp.method.reconstruct`) fits the neighbours of each gap to the model as it was
just before that removal, so the errors of earlier removals and of the fits themselves pile up; the gains
(``refine``) fix one number per channel. Refitting each later layer against the dense model's own stream
corrects what every gap upstream left, one layer's forward and backward at a time. Measured on SmolLM2-135M with
``bench/refine_variants.py --seq-steps`` and ``bench/quality.py`` (docs/RESULTS.md): after block reconstruction the
gains do better than it at k = 3, 5 and 8, so no quality level uses it; it stays an expert stage.

The dense streams need the removed layers too, so they come from the source (``dense``): a model in memory, or
a :class:`prunecomp.engine.streamed.StreamedModel` of the source folder that reads one layer at a time. Memory: two
streams of the fitting windows (pruned and dense) plus one layer, beside the pruned model. Every fitted layer's
parameters go into the recipe (the last step's ``layers``, as block reconstruction's): they replay bit for bit
and the final check swaps the source's weights back in for them.

Split as everywhere: the fit is :func:`prunecomp.method.reconstruct.fit_layers` (math on cached streams); this module is
the machinery that walks the two models and feeds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from prunecomp.errors import PrunecompError
from prunecomp.method.planning import source_num_layers
from prunecomp.method.reconstruct import fit_layers, layer_tensors
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.pruning import original_indices
from prunecomp.models.sequential import catch_layer_inputs, run_layer

__all__ = ["DenseLayers", "InMemoryDense", "RefitReport", "describe_refit", "first_gap",
           "mean_errors", "sequential_refit"]

SEED = 2000
"""Seed of the batch order (fixed: a refit is reproducible, and the recipe replays it bit for bit anyway)."""


class DenseLayers(Protocol):
    """The dense source, layer by layer: ``model`` runs the catch pass (embedding, per-layer kwargs; its decoder
    layers may live on the meta device), ``load_layer(i)`` gives ORIGINAL layer ``i`` ready to run and ``free``
    lets it go. :class:`prunecomp.engine.streamed.StreamedModel` of an unpruned folder is one."""

    model: nn.Module

    def load_layer(self, current: int) -> nn.Module: ...

    def free(self, layer: nn.Module) -> None: ...


class InMemoryDense:
    """:class:`DenseLayers` of a dense model held in memory (a GGUF or pickle source loaded again, a notebook's
    copy)."""

    def __init__(self, model: nn.Module) -> None:
        if original_indices(model) != list(range(len(decoder_layers(model)))):
            raise PrunecompError("the dense model for a refit must have all its layers (this one is pruned)")
        self.model = model

    def load_layer(self, current: int) -> nn.Module:
        return decoder_layers(self.model)[current]

    def free(self, layer: nn.Module) -> None:
        return None


@dataclass
class RefitReport:
    """What a sequential refit did: per refitted layer (ORIGINAL index) the relative error against the dense stream
    before and after its fit (equal when declined), and its cost."""

    steps: int
    lr: float
    windows: int
    layers: list[int] = field(default_factory=list)
    loss_before: list[float] = field(default_factory=list)
    loss_after: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def declined(self) -> list[int]:
        return [o for o, b, a in zip(self.layers, self.loss_before, self.loss_after, strict=True) if not a < b]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"declined": self.declined}


def mean_errors(rec: dict[str, Any]) -> tuple[float, float]:
    """Mean relative error over the refitted layers of a refit (:meth:`RefitReport.to_dict`), before and after."""
    n = max(len(rec["layers"]), 1)
    return sum(rec["loss_before"]) / n, sum(rec["loss_after"]) / n


def describe_refit(rec: dict[str, Any]) -> str:
    """A refit (:meth:`RefitReport.to_dict`) in words, for the CLI and run reports."""
    if not rec["layers"]:
        return "refit: no layer after a gap (only the last layers were removed), nothing refitted"
    n, declined = len(rec["layers"]), rec.get("declined") or []
    mean = mean_errors(rec)
    which = f"layer {rec['layers'][0]}" if n == 1 else f"layers {rec['layers'][0]}..{rec['layers'][-1]} ({n})"
    return (f"refitted {which} to the dense stream: mean relative error "
            f"{mean[0]:.4f} -> {mean[1]:.4f} ({rec['steps']} steps each on {rec['windows']} windows, "
            f"{rec['seconds']:.0f} s)" + (f"; declined for {declined}" if declined else ""))


def first_gap(model: nn.Module) -> int:
    """Index (in ``model`` now) of the first layer after the first removed one; ``len(layers)`` when only the last
    layers were removed (then no layer reads a changed stream)."""
    orig = original_indices(model)
    return next((j for j, o in enumerate(orig) if o != j), len(orig))


@torch.no_grad()
def _advance(dense: DenseLayers, d: list[Tensor], kwargs: list[list[dict]], start: int, stop: int) -> list[Tensor]:
    """The dense stream ``d`` entering original layer ``start``, carried through layers ``start .. stop - 1``."""
    for o in range(start, stop):
        layer = dense.load_layer(o)
        d = run_layer(layer, d, [kw[o] for kw in kwargs])
        dense.free(layer)
    return d


def sequential_refit(model: nn.Module, ids: Tensor, dense: DenseLayers, *, steps: int, lr: float,
                     batch_size: int = 4, on_layer: Callable[[int, float, float], None] | None = None
                     ) -> tuple[RefitReport, dict[str, Tensor]]:
    """Refit, in place and in order, every layer of ``model`` from the first gap on (:func:`first_gap`): layer
    ``j`` (original ``o``), fed the pruned stream through the layers before it as they now are, is fitted
    (:func:`prunecomp.method.reconstruct.fit_layers`, ``steps`` Adam steps at ``lr``, one batch of ``batch_size``
    windows a step) to write ``dense``'s stream after original layer ``o``. A fit that does not lower the error is
    declined.

    Returns the report and the refitted layers' parameters by name in ``model`` (CPU copies, for the recipe).
    ``on_layer(original, before, after)`` sees each fit."""
    t0 = time.perf_counter()
    layers = decoder_layers(model)
    orig = original_indices(model)
    n_dense, n_source = len(decoder_layers(dense.model)), source_num_layers(model)
    if n_dense != n_source:
        raise PrunecompError(f"the dense model has {n_dense} layers, the pruned model's source {n_source}")
    report = RefitReport(steps=steps, lr=lr, windows=int(ids.shape[0]))
    start = first_gap(model)
    if start == len(layers):
        report.seconds = time.perf_counter() - t0
        return report, {}
    caught = catch_layer_inputs(model, ids, batch_size)
    xs = caught.hidden
    for j in range(start):
        xs = run_layer(layers[j], xs, [kw[j] for kw in caught.kwargs])
    dcaught = catch_layer_inputs(dense.model, ids, batch_size)
    d, at = dcaught.hidden, 0
    gen = torch.Generator().manual_seed(SEED)
    for j in range(start, len(layers)):
        d, at = _advance(dense, d, dcaught.kwargs, at, orig[j] + 1), orig[j] + 1
        kws = [kw[j] for kw in caught.kwargs]
        before, after = fit_layers([layers[j]], xs, d, [[kw] for kw in kws], steps=steps, lr=lr, generator=gen)[:2]
        report.layers.append(int(orig[j]))
        report.loss_before.append(before)
        report.loss_after.append(after)
        if on_layer is not None:
            on_layer(int(orig[j]), before, after)
        xs = run_layer(layers[j], xs, kws)
    report.seconds = time.perf_counter() - t0
    kept = [j for j in range(start, len(layers)) if orig[j] not in report.declined]
    return report, layer_tensors(model, kept)
