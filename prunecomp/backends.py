"""What each way of holding a model can run, declared once: the in-memory model and the layer-streamed one.

The loop, the job, the pipeline and the CLI ask :func:`refusal` whether a configuration runs on a backend, so a
stage that cannot stream is refused in one place, with one message, before any work: the capabilities are data,
and a new stage says here what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunecomp.config import PruneConfig

__all__ = ["IN_MEMORY", "STREAMED", "Capabilities", "memory", "refusal"]


@dataclass(frozen=True)
class Capabilities:
    """The stages and settings a backend supports (``None``: any value)."""

    name: str
    metrics: frozenset[str] | None = None
    modes: frozenset[str] | None = None
    compensations: frozenset[str] | None = None
    selections: frozenset[str] | None = None
    reconstruct: bool = True
    refine: bool = True
    refit: bool = True
    qa: bool = True
    why: str = ""
    """What limits the backend, said once in every refusal."""


IN_MEMORY = Capabilities("in memory")
STREAMED = Capabilities(
    "layer streaming", metrics=frozenset({"bi", "angular"}), modes=frozenset({"iterative"}),
    compensations=frozenset({"guarded", "magnitude", "none"}), selections=frozenset({"score"}), refine=False,
    refit=False, qa=False,
    why="one decoder layer is in memory at a time, so nothing that back-propagates through the whole model or "
        "needs every layer at once")


def refusal(backend: Capabilities, config: PruneConfig, *, qa: bool = False) -> str | None:
    """Why ``config`` (and QA evaluation, with ``qa``) cannot run on ``backend``, or ``None`` when it can."""
    checks = [
        ("metric", config.metric, backend.metrics),
        ("mode", config.mode, backend.modes),
        ("compensation", config.compensation, backend.compensations),
        ("selection", config.selection, backend.selections),
    ]
    for what, value, allowed in checks:
        if allowed is not None and value not in allowed:
            return (f"{backend.name} cannot run {what} {value!r} (it runs {', '.join(sorted(allowed))}; "
                    f"{backend.why}); drop the option or run in memory")
    stages = [("the gains (--refine, refine)", config.refine != "none", backend.refine),
              ("the sequential refit (--refit, refit)", config.refit != "none", backend.refit),
              ("block reconstruction (--reconstruct, reconstruct)", config.reconstruct != "none", backend.reconstruct),
              ("QA tasks", qa, backend.qa)]
    for what, wanted, supported in stages:
        if wanted and not supported:
            return f"{backend.name} cannot run {what} ({backend.why}); run it in memory, or leave that stage out"
    return None


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
