"""What each way of holding a model can run, declared once: the in-memory model and the layer-streamed one.

The loop, the job, the pipeline and the CLI ask :func:`prunecomp.engine.stages.refusal` whether a configuration runs on
a backend, so a stage that cannot stream is refused in one place, with one message, before any work: the
capabilities are data here, and a new stage declares what it needs in its registry entry
(:mod:`prunecomp.engine.stages`). :class:`Backend` is what the loop runs against, whichever way the model is held.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import Tensor, nn

    from prunecomp.config import PruneConfig
    from prunecomp.method.guard import GuardResult
    from prunecomp.method.reconstruct import GapStreams, ReconstructReport
    from prunecomp.method.scoring import LayerScan
    from prunecomp.recipes.recipe import Recipe

__all__ = ["ABILITIES", "IN_MEMORY", "STREAMED", "Backend", "Capabilities", "memory"]

ABILITIES: dict[str, str] = {
    "gap_map": "the lsq gap map (--compensation lsq, compensation: lsq)",
    "trials": "selection by loss (--selection loss, selection)",
    "reconstruct": "block reconstruction (--reconstruct, reconstruct)",
    "refine": "the gains (--refine, refine)",
    "refit": "the sequential refit (--refit, refit)",
    "qa": "QA tasks",
}
"""What a stage may need of a backend beyond reading, running and removing layers, and how refusals name it."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend runs: the metrics and modes (``None``: any) and the :data:`ABILITIES` it has."""

    name: str
    metrics: frozenset[str] | None = None
    modes: frozenset[str] | None = None
    abilities: frozenset[str] = frozenset(ABILITIES)
    why: str = ""
    """What limits the backend, said once in every refusal."""


IN_MEMORY = Capabilities("in memory")
STREAMED = Capabilities(
    "layer streaming", metrics=frozenset({"bi", "angular"}), modes=frozenset({"iterative"}),
    abilities=frozenset({"reconstruct"}),
    why="one decoder layer is in memory at a time, so nothing that back-propagates through the whole model or "
        "needs every layer at once")


class Backend(Protocol):
    """A model whose layers the loop can read, run, fit and remove, bound to the calibration windows of a run.

    Implemented by the in-memory model (:class:`prunecomp.engine.memory_backend.InMemory`) and the layer-streamed one
    (:class:`prunecomp.engine.streamed_backend.Streamed`); the loop (:mod:`prunecomp.engine.loop`) and the stages
    (:mod:`prunecomp.engine.stages`) call only this. Indices are current indices; ``model`` is the HF model (a skeleton
    whose layers live on disk when streamed): its layer list and original indices are the loop's bookkeeping."""

    capabilities: Capabilities
    model: nn.Module
    ids: Tensor
    """The calibration windows: what the loop scores, the guard measures and selection by loss compares (empty for
    a backend opened only to measure or replay)."""
    batch_size: int
    scoring: str
    """How layers are scored, for the report: ``incremental``, ``exact`` or ``streamed``."""

    def scan(self, metric: str, *, block_size: int, candidates: Sequence[int]) -> LayerScan:
        """Every current layer's score and gap scale."""
        ...

    def with_scores(self, metric: str, scores: Mapping[int, float], candidates: Sequence[int]) -> LayerScan:
        """A scan whose scores (ORIGINAL index -> score) were computed elsewhere; the gap scales measured here."""
        ...

    def guard(self, current: int, s: float, exponents: Sequence[float]) -> GuardResult:
        """The guard's measurement for removing ``current`` (still there) with candidates ``s ** a``."""
        ...

    def select_by_loss(self, scan: LayerScan, candidates: list[int], config: PruneConfig
                       ) -> tuple[int, dict[int, float], GuardResult | None]:
        """Selection by loss (ability ``trials``): the layer, every trial's loss, the winner's guard."""
        ...

    def fit_gap_map(self, current: int, scale: float, *, ridge: float) -> Any:
        """The lsq map of the gap at ``current`` (ability ``gap_map``), fitted while the layer is there."""
        ...

    def keep_gap_map(self, current: int, fit: Any, guard: GuardResult) -> bool:
        """Fold ``fit`` (layer removed, scale folded) only when it lowers the calibration loss."""
        ...

    def capture_gap(self, current: int, ids: Tensor, side: str, *, batch_size: int,
                    check: Tensor | None = None) -> GapStreams | None:
        """The streams block reconstruction fits, read while layer ``current`` is there (ability
        ``reconstruct``), and the same on the held-out windows ``check`` in the same pass."""
        ...

    def fit_layers(self, gap: GapStreams, scale: float, *, steps: int, lr: float, seed: int, removed: int
                   ) -> tuple[ReconstructReport, Mapping[str, Tensor] | None]:
        """Fit the layers beside the gap (after the removal) and keep the fit when it lowers the error (on the
        held-out streams too, when ``gap.check`` has some); the report and, when kept, the fitted parameters by name
        in the model (the recipe's record)."""
        ...

    def remove(self, current: int, scale: float) -> None:
        """Remove layer ``current`` and fold ``scale`` into everything upstream of the gap."""
        ...

    def changed(self, first_layer: int | None) -> None:
        """The outputs of layers ``first_layer`` and later changed beyond a rescale (``None``: the embedding's
        too): whatever the backend cached of them is stale."""
        ...

    def mean_nll(self, ids: Tensor) -> float:
        """Mean next-token NLL of the model as it is now on windows ``ids``."""
        ...

    sourced: Callable[[Mapping[int, int]], AbstractContextManager[None]] | None
    """How the final check puts the source's weights in for layers block reconstruction rewrote, when the backend
    loads layers on use (``None`` in memory: the caller passes those weights, see
    :func:`prunecomp.engine.final_check.uncompensated_view`)."""

    def replay(self, recipe: Recipe, *, start: int = 0, refined: bool = False) -> None:
        """Replay ``recipe`` from step ``start`` (the model is at that state; ``refined``: the fit that followed
        step ``start`` is folded too) with exactly the run's numbers."""
        ...


def memory(device: object = None) -> tuple[int, int]:
    """``(available, total)`` bytes where a model (or its cached activations) would live: free and total memory of
    the CUDA device when ``device`` is one (or, with no device, when CUDA is there), else the host's
    ``MemAvailable`` and physical memory. The one place that reads memory: the pipeline's choice of backend and the
    incremental scanner's cache budget both start here."""
    import os

    import torch

    cuda = torch.cuda.is_available() and (device is None or getattr(device, "type", None) == "cuda")
    if cuda:
        free, total = torch.cuda.mem_get_info(device if device is not None else None)
        return int(free), int(total)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 2 << 30
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        available = info.get("MemAvailable", total)
    except (OSError, ValueError, IndexError):
        available = total
    return int(available), int(total)
