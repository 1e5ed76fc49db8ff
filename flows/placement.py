"""Where a run's model lives: in memory, or layer-streamed (one decoder layer at a time).

``stream_layers`` in the parameters decides; left unset, the run streams by itself when the weights do not fit
60% of the memory available where the model would live (:func:`prunecomp.engine.backends.memory`), and it can stream
(:data:`prunecomp.engine.backends.STREAMED`'s capabilities, and a safetensors source).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flows.params import CompressConfig
from prunecomp.engine.backends import STREAMED, memory
from prunecomp.engine.stages import refusal

__all__ = ["Placement", "memory_budget", "not_streamable", "place"]

IN_MEMORY_SHARE = 0.6
"""Share of the available memory a whole model may take: the rest is for activations, the scanner's cache, the
evaluation and the libraries."""


def memory_budget() -> int:
    """Bytes a whole model may take in memory (GPU memory on CUDA)."""
    return int(memory()[0] * IN_MEMORY_SHARE)


@dataclass(frozen=True)
class Placement:
    """Whether the run streams layers, why, and whether the weights exceeded the budget (worth a warning)."""

    stream: bool
    reason: str
    over_budget: bool = False


def not_streamable(config: CompressConfig, base: dict[str, Any]) -> str | None:
    """Why this run cannot be layer-streamed, or ``None`` when it can: the streamed backend's capabilities, and
    its one input format."""
    why = refusal(STREAMED, config.prune, qa=bool(config.qa_tasks))
    if why is not None:
        return why
    if base.get("materialized"):
        return "layer streaming reads safetensors sources; this one (GGUF or pickle) is materialised in memory first"
    return None


def place(config: CompressConfig, base: dict[str, Any]) -> Placement:
    """``config.stream_layers``, or (when unset) whether the model does not fit the memory budget; and why."""
    if config.stream_layers is not None:
        return Placement(config.stream_layers, "stream_layers set in the run's parameters")
    need, budget = int(base.get("weight_bytes") or 0), memory_budget()
    if need <= budget:
        return Placement(False, f"weights {need / 2**30:.2f} GiB fit the in-memory budget {budget / 2**30:.1f} GiB")
    why_not = not_streamable(config, base)
    if why_not is None:
        return Placement(True, f"automatic: weights {need / 2**30:.2f} GiB exceed the in-memory budget "
                               f"{budget / 2**30:.2f} GiB, so streaming layers (one decoder layer in memory at a "
                               "time; stream_layers: false to override)", over_budget=True)
    return Placement(False, f"weights {need / 2**30:.2f} GiB exceed the in-memory budget {budget / 2**30:.2f} GiB, "
                            f"but the run cannot stream ({why_not}): loading it anyway", over_budget=True)
