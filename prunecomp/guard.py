"""Guarded compensation: measure what folding the gap scale does to the calibration loss before folding it.

Why: the paper folds the measured magnitude gap ``s`` blindly, and on some models (and on SmolLM2 at k = 3) that
is worse than not compensating at all. The guard measures the calibration NLL of the compensated candidate for
``c = s ** a`` over a short grid of exponents ``a`` that always includes 0 (no compensation) and 1 (the paper's
``s``), and folds the best one. Decisions are recorded: ``paper`` (``a = 1`` won), ``declined`` (``a = 0`` won),
``adjusted`` (another point of the grid won).

Why it is cheap: compensating the gap at ``current`` by ``c`` makes the stream entering the next layer exactly
``c`` times the stream that entered the removed layer (every upstream writer and the embedding are scaled, every
pre-norm sub-layer computes the same; see :mod:`prunecomp.compensation`), and the head is scale invariant (final
norm; a tied head's scaling is undone by the fold). So each candidate costs only the layers after the gap, run from
the cached stream at the gap, and the model is never modified while measuring.

The math (the grid, the choice) is pure; :func:`tail_losses` is the machinery, shared by the in-memory loop
(:func:`guard_in_memory`) and the layer-streamed model (``StreamedModel.guard``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunecomp.adapters import decoder_layers, get_adapter
from prunecomp.sequential import catch_layer_inputs, head_nll, run_layer

__all__ = ["DEFAULT_EXPONENTS", "GuardResult", "candidate_scales", "gap_stream", "guard_cell", "guard_in_memory",
           "guard_line", "pick", "tail_losses"]

DEFAULT_EXPONENTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
"""``c = s ** a``: from no compensation (0) through the paper's scale (1) to a little beyond it (1.25)."""


def candidate_scales(s: float, exponents: Sequence[float]) -> list[float]:
    """The scales the guard measures: ``s ** a`` (exactly 1.0 for ``a = 0`` and exactly ``s`` for ``a = 1``)."""
    return [1.0 if a == 0 else (s if a == 1 else float(s ** a)) for a in exponents]


def pick(exponents: Sequence[float], losses: Sequence[float]) -> int:
    """Index of the lowest loss; ties go to the exponent nearest the paper's (1), then the smaller one."""
    return min(range(len(losses)), key=lambda i: (losses[i], abs(exponents[i] - 1.0), exponents[i]))


@dataclass
class GuardResult:
    """What the guard measured for one removal and what it chose (``chosen`` indexes ``exponents``)."""

    measured_scale: float
    exponents: list[float]
    scales: list[float]
    losses: list[float]
    chosen: int
    map_loss: float | None = None  # lsq: calibration NLL with the fitted gap map folded on top of the chosen scale
    map_kept: bool | None = None

    @property
    def scale(self) -> float:
        return self.scales[self.chosen]

    @property
    def loss(self) -> float:
        """The loss of what is folded."""
        return self.map_loss if self.map_kept else self.losses[self.chosen]

    @property
    def decision(self) -> str:
        a = self.exponents[self.chosen]
        return "paper" if a == 1 else ("declined" if a == 0 else "adjusted")

    @property
    def paper_loss(self) -> float:
        return self.losses[self.exponents.index(1.0)]

    @property
    def uncompensated_loss(self) -> float:
        return self.losses[self.exponents.index(0.0)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": self.decision, "measured_scale": self.measured_scale, "scale": self.scale,
            "exponent": self.exponents[self.chosen], "exponents": list(self.exponents), "scales": list(self.scales),
            "losses": list(self.losses), "paper_loss": self.paper_loss, "uncompensated_loss": self.uncompensated_loss,
        }
        if self.map_kept is not None:
            out |= {"map_loss": self.map_loss, "map_kept": self.map_kept}
        return out

    def summary(self) -> str:
        """One line for consoles and logs."""
        return guard_line(self.to_dict())


def guard_line(doc: dict[str, Any]) -> str:
    """A step record's guard (:meth:`GuardResult.to_dict`, also read back from JSON) as one line."""
    s, folded = float(doc["measured_scale"]), float(doc["scale"])
    text = {"paper": f"kept the paper's s = {s:.4f}",
            "declined": f"declined s = {s:.4f} (no compensation measured better)",
            "adjusted": f"adjusted s = {s:.4f} to {folded:.4f}"}[doc["decision"]]
    chosen = doc["losses"][doc["scales"].index(folded)] if folded in doc["scales"] else float("nan")
    text += (f"; calibration NLL {chosen:.4f} vs paper {doc['paper_loss']:.4f}, "
             f"none {doc['uncompensated_loss']:.4f}")
    if doc.get("map_kept") is not None:
        text += f"; lsq map {'kept' if doc['map_kept'] else 'dropped'} (NLL {doc['map_loss']:.4f})"
    return text


def guard_cell(doc: dict[str, Any] | None) -> str:
    """A step record's guard decision for a table cell (``-``: no guard ran)."""
    if not doc:
        return "-"
    cell = str(doc["decision"])
    if doc.get("map_kept") is not None:
        cell += " +map" if doc["map_kept"] else " -map"
    return cell


@torch.no_grad()
def tail_losses(layer_at: Callable[[int], nn.Module], first: int, last: int, streams: Sequence[Tensor],
                kwargs: Sequence[Sequence[dict]], batches: Sequence[Tensor], scales: Sequence[float],
                head: Callable[[Tensor, Tensor], tuple[float, int]], *, group: int | None = None,
                release: Callable[[nn.Module], None] | None = None) -> list[float]:
    """Mean NLL, per scale ``c``, of running layers ``[first, last)`` on ``c x streams[b]`` for every batch ``b``.

    ``kwargs[b][j]``: layer ``j``'s keyword arguments for batch ``b``. Work items (scale, batch) run ``group`` at a
    time (default: one batch's scales together), each group in one pass over the layers: a layer-streamed model
    loads each tail layer once per group (``layer_at`` / ``release``), so callers size ``group`` by memory.
    """
    items = [(c, b) for b in range(len(streams)) for c in range(len(scales))]
    group = group or len(scales)
    totals = [0.0] * len(scales)
    counts = [0] * len(scales)
    for start in range(0, len(items), group):
        chunk = items[start : start + group]
        xs = [streams[b] * scales[c] for c, b in chunk]
        for j in range(first, last):
            layer = layer_at(j)
            xs = [run_layer(layer, [x], [kwargs[b][j]])[0] for x, (_c, b) in zip(xs, chunk, strict=True)]
            if release is not None:
                release(layer)
        for x, (c, b) in zip(xs, chunk, strict=True):
            nll, n = head(x, batches[b])
            totals[c] += nll
            counts[c] += n
    return [t / n for t, n in zip(totals, counts, strict=True)]


@torch.no_grad()
def gap_stream(model: nn.Module, ids: Tensor, current: int, *, batch_size: int,
               cached: tuple[list[Tensor], list[list[dict]]] | None = None) -> tuple[list[Tensor], list[list[dict]]]:
    """The residual stream entering layer ``current`` (per batch) and every layer's kwargs per batch: ``cached``
    (an incremental scanner's boundary) when given, else one partial forward through layers ``[0, current)``."""
    if cached is not None:
        return cached
    layers = decoder_layers(model)
    caught = catch_layer_inputs(model, ids, batch_size)
    xs = caught.hidden
    for j in range(current):
        xs = run_layer(layers[j], xs, [kw[j] for kw in caught.kwargs])
    return xs, caught.kwargs


def guard_in_memory(model: nn.Module, ids: Tensor, current: int, s: float, exponents: Sequence[float], *,
                    batch_size: int, cached: tuple[list[Tensor], list[list[dict]]] | None = None) -> GuardResult:
    """Measure the guard's grid for removing layer ``current`` (still present) of an in-memory model."""
    adapter = get_adapter(model)
    layers = decoder_layers(model, adapter)
    streams, kwargs = gap_stream(model, ids, current, batch_size=batch_size, cached=cached)
    batches = [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    scales = candidate_scales(s, exponents)
    losses = tail_losses(layers.__getitem__, current + 1, len(layers), streams, kwargs, batches, scales,
                         lambda x, b: head_nll(model, x, b, adapter))
    return GuardResult(measured_scale=s, exponents=list(exponents), scales=scales, losses=losses,
                       chosen=pick(exponents, losses))
