"""One interface for scoring the layers of a model as it is pruned: :class:`Scanner`.

Three implementations, one contract (same scores and gap scales up to float rounding, tested against each other):

* :func:`exact_scanner`: every scan runs the whole model (:func:`prunecomp.method.scoring.scan_layers`); stateless.
* :class:`~prunecomp.engine.incremental.IncrementalScanner`: caches the residual stream at every layer boundary and
  re-runs only what a removal or a fold changed.
* :meth:`~prunecomp.engine.streamed.StreamedModel.scan`: the layer-streamed model, one decoder layer in memory at a time
  (the :class:`~prunecomp.engine.streamed_backend.Streamed` backend scores through it directly: there is nothing to
  cache).

The caller tells a scanner what changed, explicitly, after every edit of the model: :meth:`Scanner.removed` after
a removal and its uniform upstream rescale, :meth:`Scanner.invalidate` after a fold that changes some layers'
outputs beyond a rescale (an ``lsq`` gap map: the layer it is folded into; into the embedding: everything).
:func:`make_scanner` holds the memory policy (incremental within a budget, else exact).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from torch import Tensor, nn

from prunecomp.config import PruneConfig
from prunecomp.corpora.calibration import TokenWindows
from prunecomp.engine.incremental import INCREMENTAL_METRICS, IncrementalScanner, cache_bytes
from prunecomp.method.scoring import LayerScan, scan_layers

__all__ = ["Scanner", "StatelessScanner", "exact_scanner", "make_scanner", "memory_budget"]

log = logging.getLogger(__name__)


class Scanner(Protocol):
    """Scores and gap scales of the current layers of one model, told about every edit of it."""

    layer_forwards: int

    def scan(self, metric: str, *, block_size: int = 1, candidates: Sequence[int] | None = None) -> LayerScan:
        """Every current layer's score (lower goes first) and gap scale; ``candidates`` bounds per-candidate
        metrics."""
        ...

    def removed(self, current: int, scale: float) -> None:
        """Layer ``current`` was removed and ``scale`` folded into everything upstream of the gap."""
        ...

    def invalidate(self, first_layer: int | None) -> None:
        """Outputs of layers ``first_layer`` and later changed beyond a rescale; ``None``: the embedding too."""
        ...

    def boundary(self, current: int) -> tuple[list[Tensor], list[list[dict]]] | None:
        """The cached stream entering layer ``current`` (per batch) and every layer's kwargs per batch, when the
        cache is up to date with the model; ``None`` otherwise (the caller recomputes it)."""
        ...


class StatelessScanner:
    """A scanner that runs its whole pass on every scan (exact, or layer-streamed): nothing is cached between
    scans, so removals and folds need no invalidation."""

    def __init__(self, run: Callable[[str, int, Sequence[int] | None], LayerScan], kind: str) -> None:
        self._run, self.kind = run, kind
        self.layer_forwards = 0

    def scan(self, metric: str, *, block_size: int = 1, candidates: Sequence[int] | None = None) -> LayerScan:
        out = self._run(metric, block_size, candidates)
        self.layer_forwards += out.layer_forwards
        return out

    def removed(self, current: int, scale: float) -> None:
        return None

    def invalidate(self, first_layer: int | None) -> None:
        return None

    def boundary(self, current: int) -> tuple[list[Tensor], list[list[dict]]] | None:
        return None


def exact_scanner(model: nn.Module, ids: Tensor, *, batch_size: int,
                  on_batch: Callable[[], None] | None = None) -> StatelessScanner:
    """Every scan runs the whole model (:func:`prunecomp.method.scoring.scan_layers`)."""

    def run(metric: str, block_size: int, candidates: Sequence[int] | None) -> LayerScan:
        return scan_layers(model, ids, metric, batch_size=batch_size, block_size=block_size,  # type: ignore[arg-type]
                           candidates=candidates, on_batch=on_batch)

    return StatelessScanner(run, "exact")


def memory_budget(device: object = None) -> int:
    """Default ceiling for the incremental boundary cache, on the device the cached activations live on (the
    model's): a quarter of the free GPU memory on CUDA, a quarter of physical memory otherwise."""
    import torch

    from prunecomp.engine.backends import memory

    cuda = getattr(device, "type", None) == "cuda"
    available, total = memory(device if cuda else torch.device("cpu"))
    return (available if cuda else total) // 4


def make_scanner(model: nn.Module, calibration: TokenWindows | Tensor, config: PruneConfig, *, batch_size: int,
                 on_batch: Callable[[], None] | None = None, cache_budget_bytes: int | None = None) -> Scanner:
    """An incremental scanner when the config asks for one, the metric has an incremental form and the boundary
    cache fits the budget; an exact one otherwise."""
    ids = calibration.ids if isinstance(calibration, TokenWindows) else calibration
    if config.scoring != "incremental" or config.metric not in INCREMENTAL_METRICS:
        return exact_scanner(model, ids, batch_size=batch_size, on_batch=on_batch)
    need = cache_bytes(model, ids.shape[0], ids.shape[1])
    device = next(model.parameters()).device
    if need > (cache_budget_bytes if cache_budget_bytes is not None else memory_budget(device)):
        log.warning("incremental scoring needs %.1f GiB of cached activations, over budget: scoring exactly",
                    need / 2**30)
        return exact_scanner(model, ids, batch_size=batch_size, on_batch=on_batch)
    return IncrementalScanner(model, ids, batch_size=batch_size, on_batch=on_batch)
