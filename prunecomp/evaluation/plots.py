"""PNG plots of a pruning run: layer scores per iteration, perplexity per step, and the magnitude-gap scale per step.

Why these three: the heatmap shows where the metric looked and how re-scoring after each compensated removal moves
the scores (the point of the iterative method); the perplexity curves show what compensation buys step by step;
the scale plot shows how large the folded correction was.

Every function takes plain dicts/lists (a report as written by ``prunecomp prune --json``, the ``steps`` of a
pipeline run's ``report.json`` (records under ``"record"``), or ``PruneReport.to_dict()``), so plots can be redrawn
from JSON long after the run. Figures are drawn on matplotlib's Agg canvas directly, without pyplot: no display is
needed and the caller's global matplotlib backend (a notebook's, say) is left alone. Bad input raises
:class:`~prunecomp.errors.PrunecompError` with what was expected.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunecomp.errors import PrunecompError

__all__ = ["plot_ppl_curves", "plot_scales", "plot_scores", "save_report_plots", "step_perplexities",
           "step_records"]

PLOT_FILES = {"scores": "layer_scores.png", "scales": "gap_scales.png", "perplexity": "perplexity_steps.png"}
"""File names :func:`save_report_plots` writes."""

_EXPECTED = "a prunecomp report (JSON of `prunecomp prune --json` or a pipeline run's report.json) with 'steps'"


def step_records(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The step records (``step``, ``scores``, ``chosen``, scales...) of a report, in order; checked."""
    if not isinstance(report, Mapping):
        raise PrunecompError(f"expected {_EXPECTED}, got {type(report).__name__}")
    steps = report.get("steps")
    if not isinstance(steps, Sequence) or not steps:
        raise PrunecompError(f"the report has no pruning steps, nothing to plot; expected {_EXPECTED}")
    records = []
    for i, step in enumerate(steps):
        rec = step.get("record", step) if isinstance(step, Mapping) else None
        if not isinstance(rec, Mapping) or not isinstance(rec.get("scores"), Mapping) or "chosen" not in rec:
            raise PrunecompError(f"step {i} of the report has no 'scores'/'chosen'; expected {_EXPECTED}")
        records.append(dict(rec))
    return records


def step_perplexities(report: Mapping[str, Any]) -> tuple[list[float], float | None] | None:
    """``(perplexity after each step, dense perplexity)`` when the report has per-step values, else None.

    Pipeline runs measure a quick perplexity after every step (``ppl_before`` / ``ppl_after`` per corpus; the mean
    over corpora is used); ``prunecomp prune`` reports only dense and final perplexity, so it has none.
    """
    steps = report.get("steps") or []
    after = [s.get("ppl_after") if isinstance(s, Mapping) else None for s in steps]
    if not after or not all(isinstance(a, Mapping) and a for a in after):
        return None

    def mean(d: Mapping[str, Any]) -> float:
        return sum(float(v) for v in d.values()) / len(d)

    before = steps[0].get("ppl_before")
    return [mean(a) for a in after], mean(before) if isinstance(before, Mapping) and before else None


def _canvas(width: float, height: float) -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # matplotlib is in the optional eval extra
        raise PrunecompError("plots need matplotlib: pip install 'prunecomp[eval]'") from err
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write the PNG atomically (temp file + rename): a reader never sees half an image."""
    target = Path(path).expanduser()
    if "://" in str(path):
        raise PrunecompError(f"plots are written to local paths only, got {str(path)!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _num_layers(report: Mapping[str, Any], records: list[dict[str, Any]]) -> int:
    n = report.get("source_num_layers") or (report.get("base") or {}).get("num_layers")
    seen = 1 + max(int(k) for r in records for k in r["scores"]) if any(r["scores"] for r in records) else 0
    return max(int(n or 0), seen, 1 + max(int(r["chosen"]) for r in records))


def _metric(records: list[dict[str, Any]]) -> str:
    return str(records[0].get("metric") or "score")


def plot_scores(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Heatmap of every layer's score at every iteration (rows) by ORIGINAL layer index (columns).

    Layers already removed are blank; the layer removed at each iteration has a red box. The colour scale stops at
    a log scale when positive scores span more than 20x (BI's first and last layers dwarf the middle ones), else
    it stops at the 95th percentile so a few outliers do not flatten the rest.
    """
    import numpy as np
    from matplotlib.patches import Rectangle

    records = step_records(report)
    n_layers = _num_layers(report, records)
    grid = np.full((len(records), n_layers), np.nan)
    for i, rec in enumerate(records):
        for k, v in rec["scores"].items():
            if v is not None and math.isfinite(float(v)):
                grid[i, int(k)] = float(v)
    finite = grid[np.isfinite(grid)]
    fig, ax = _canvas(max(6.0, 0.32 * n_layers + 2.5), max(3.0, 0.45 * len(records) + 2.0))
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    norm: Normalize = Normalize(0.0, 1.0)
    if finite.size and float(finite.min()) > 0 and float(finite.max()) / float(finite.min()) >= 20:
        norm = LogNorm(float(finite.min()), float(finite.max()))  # BI & co: the first/last layers dwarf the rest
    elif finite.size:
        vmin, vmax = float(finite.min()), float(np.percentile(finite, 95))
        vmax = vmax if vmax > vmin else max(float(finite.max()), vmin + 1e-12)
        norm = Normalize(vmin, vmax)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for i, rec in enumerate(records):
        ax.add_patch(Rectangle((int(rec["chosen"]) - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    metric = _metric(records)
    ax.set_title(f"Layer scores per iteration ({metric})\nred box: removed at that step; blank: already removed",
                 fontsize=10)
    ax.set_xlabel("original layer index")
    ax.set_ylabel("iteration: removed layer")
    xstep = 1 if n_layers <= 32 else 2 if n_layers <= 64 else 5
    ax.set_xticks(range(0, n_layers, xstep))
    ax.set_yticks(range(len(records)))
    ax.set_yticklabels([f"{i + 1}: L{rec['chosen']}" for i, rec in enumerate(records)])
    extend = "max" if finite.size and float(finite.max()) > float(norm.vmax) else "neither"
    scale = ", log scale" if isinstance(norm, LogNorm) else ""
    fig.colorbar(im, ax=ax, label=f"{metric} score (lower = less important{scale})", extend=extend)
    return _save(fig, path)


def plot_scales(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """The magnitude-gap scale ``s`` measured at each step (and the one applied, where it differs), with ``s = 1``."""
    records = step_records(report)
    steps = list(range(1, len(records) + 1))
    try:
        measured = [float(r["measured_scale"]) for r in records]
        applied = [float(r.get("applied_scale", r["measured_scale"])) for r in records]
    except (KeyError, TypeError, ValueError) as err:
        raise PrunecompError(f"a step of the report has no numeric 'measured_scale'; expected {_EXPECTED}") from err
    fig, ax = _canvas(max(5.0, 0.5 * len(records) + 3.0), 3.8)
    ax.plot(steps, measured, marker="o", color="tab:blue", label="measured s")
    if any(abs(a - m) > 1e-12 for a, m in zip(applied, measured, strict=True)):
        ax.plot(steps, applied, marker="s", ls="--", color="tab:orange", label="applied")
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="s = 1 (no gap)")
    for x, y, rec in zip(steps, measured, records, strict=True):
        ax.annotate(f"L{rec['chosen']}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.set_title("Magnitude-gap scale s per pruning step")
    ax.set_xlabel("pruning step (point label: removed original layer)")
    ax.set_ylabel("s = mean|x_out| / mean|x_in|")
    ax.set_xticks(steps)
    ax.margins(y=0.2)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ppl_curves(curves: Mapping[str, Sequence[float | None]], path: str | os.PathLike[str], *,
                    dense: float | None = None, dataset: str | None = None) -> Path:
    """Perplexity after each pruning step, one line per run (e.g. ``{"prune&comp": [...], "no compensation":
    [...]}``, value ``i`` = after ``i + 1`` removals), on a log scale; ``dense`` starts every line at step 0.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise PrunecompError("plot_ppl_curves needs at least one curve: {label: [perplexity after step 1, ...]}")
    clean: dict[str, list[float]] = {}
    for label, values in curves.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise PrunecompError(f"curve {label!r} must be a non-empty list of perplexities")
        try:
            row = [math.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError) as err:
            raise PrunecompError(f"curve {label!r} has a non-numeric perplexity") from err
        if any(v <= 0 for v in row) or all(math.isnan(v) for v in row):
            raise PrunecompError(f"curve {label!r} must hold positive perplexities")
        clean[str(label)] = row
    if dense is not None and not (math.isfinite(dense) and dense > 0):
        raise PrunecompError(f"dense perplexity must be a positive number, got {dense!r}")
    longest = max(len(v) for v in clean.values())
    fig, ax = _canvas(max(5.0, 0.5 * longest + 3.0), 4.0)
    for label, row in clean.items():
        xs = list(range(1, len(row) + 1))
        if dense is not None:
            xs, row = [0, *xs], [dense, *row]
        ax.plot(xs, row, marker="o", label=label)
    if dense is not None:
        ax.axhline(dense, color="grey", ls=":", lw=1, label=f"dense ({dense:.2f})")
    ax.set_yscale("log")
    ax.set_title("Perplexity after each pruning step" + (f" ({dataset})" if dataset else ""))
    ax.set_xlabel("layers removed")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_xticks(range(0 if dense is not None else 1, longest + 1))
    ax.legend(fontsize=8)
    return _save(fig, path)


_COMPENSATION_LABEL = {"magnitude": "Prune&Comp (magnitude)", "none": "no compensation", "lsq": "lsq compensation"}


def save_report_plots(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the plots a report supports into ``out_dir`` (see :data:`PLOT_FILES`) and return their paths.

    Always the score heatmap and the scale plot; the perplexity curve only when the report has per-step
    perplexity (pipeline runs), as its single curve labelled with the run's compensation.
    """
    step_records(report)  # one clear error for an empty or foreign report, before anything is written
    out = Path(out_dir).expanduser()
    paths = [plot_scores(report, out / PLOT_FILES["scores"]), plot_scales(report, out / PLOT_FILES["scales"])]
    per_step = step_perplexities(report)
    if per_step is not None:
        config = report.get("config") or {}
        comp = (config.get("prune") or config).get("compensation", "run")
        datasets = sorted({k for s in report["steps"] for k in s["ppl_after"]})
        paths.append(plot_ppl_curves({_COMPENSATION_LABEL.get(comp, str(comp)): per_step[0]},
                                     out / PLOT_FILES["perplexity"], dense=per_step[1],
                                     dataset="mean of " + ", ".join(datasets) if len(datasets) > 1 else datasets[0]))
    return paths
