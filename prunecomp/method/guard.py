"""Guarded compensation: measure what folding the gap scale does to the calibration loss before folding it.

Why: the paper folds the measured magnitude gap ``s`` blindly, and on some models (and on SmolLM2 at k = 3) that
is worse than not compensating at all. The guard measures the calibration NLL of the compensated candidate for
``c = s ** a`` over a short grid of exponents ``a`` that always includes 0 (no compensation) and 1 (the paper's
``s``), and folds the best one. Decisions are recorded: ``paper`` (``a = 1`` won), ``declined`` (``a = 0`` won),
``adjusted`` (another point of the grid won).

Why each candidate costs only the layers after the gap: compensating the gap at ``current`` by ``c`` makes the
stream entering the next layer exactly ``c`` times the stream that entered the removed layer (every upstream
writer and the embedding are scaled, every pre-norm sub-layer computes the same; see
:mod:`prunecomp.method.compensation`), and the head is scale invariant (final norm; a tied head's scaling is undone by
the fold). So a candidate runs from the cached stream at the gap, and the model is never modified while measuring.

Why it measures on a share of the windows and not the whole grid: a candidate still costs a pass of the tail and
a full-vocabulary head, as much as the scoring pass the step runs anyway, so six candidates on every window cost
an order of magnitude more than the paper's step for a choice worth a few thousandths of a nat. What decides is a
*difference* of losses on the same tokens, far less noisy than a loss, so the guard measures on the first
:meth:`GuardBudget.windows` windows (1/32 of them, at least 512 tokens; a small calibration set whole), the head
on every other position, and searches the grid instead of sweeping it (:func:`next_exponents`): 0 and 1 first,
then one point past the better of them, then the grid point a parabola through what was measured puts lowest,
until that point has been measured: 3 or 4 candidates where the loss is close to a parabola in ``a`` (it is,
over the grid's range), never more than the grid. The choice is always a measured point (:func:`pick` over the
measured ones). Where the grid's candidates differ by less than the share's noise, the choice can differ from the
exhaustive grid's; what it folds then costs about that noise (tested against the exhaustive grid). What was
measured (windows, tokens, candidates, rounds) is in the record; :data:`EXHAUSTIVE` is the whole grid on every
window and position.

The math (the grid, the search, the choice) is pure; :func:`guard_tail` is the machinery, shared by the in-memory
loop (:func:`guard_in_memory`) and the layer-streamed model (``StreamedModel.guard``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from prunecomp.config import DEFAULT_EXPONENTS
from prunecomp.models.adapters import decoder_layers, get_adapter
from prunecomp.models.sequential import catch_layer_inputs, head_nll, run_layer

__all__ = ["DEFAULT_BUDGET", "DEFAULT_EXPONENTS", "EXHAUSTIVE", "GuardBudget", "GuardResult", "candidate_scales",
           "first_windows", "gap_stream", "guard_cell", "guard_in_memory", "guard_line", "guard_tail",
           "next_exponents", "parabola", "pick", "tail_losses"]




@dataclass(frozen=True)
class GuardBudget:
    """How much the guard measures: the first ``windows(...)`` calibration windows, which of their positions the
    head scores, and how it walks the grid.

    ``fraction``: the share of the calibration windows; ``min_tokens``: but at least this many tokens, so a small
    calibration set is measured whole. ``stride``: on a share of the windows, the head scores every ``stride``-th
    position (it costs as much per token as ~8 of SmolLM2's layers, and neighbouring tokens' loss differences are
    correlated; the whole set is measured at every position). ``search``: ``parabola`` (:func:`next_exponents`)
    or ``grid`` (every exponent at once). The defaults keep the guard near a fifth of the paper's step time
    (about 3 candidates x 1/32 of the windows x tail and half a head, against one scoring pass over the tail;
    on the ``cpu`` preset the 512-token floor makes it 2 of 32 windows), measured by ``bench/guard_cost.py``.
    """

    fraction: float = 1 / 32
    min_tokens: int = 512
    stride: int = 2
    search: Literal["parabola", "grid"] = "parabola"

    def windows(self, n_windows: int, seq_len: int) -> int:
        """How many of ``n_windows`` windows of ``seq_len`` tokens the guard measures on."""
        want = max(math.ceil(n_windows * self.fraction), math.ceil(self.min_tokens / max(seq_len, 1)), 1)
        return min(n_windows, want)

    def positions(self, n_windows: int, seq_len: int) -> int:
        """The stride of the positions the head scores: 1 when the whole set is measured."""
        return 1 if self.windows(n_windows, seq_len) >= n_windows else self.stride


DEFAULT_BUDGET = GuardBudget()
EXHAUSTIVE = GuardBudget(fraction=1.0, stride=1, search="grid")
"""Every exponent of the grid on every calibration window: the reference the default budget is tested against."""


def candidate_scales(s: float, exponents: Sequence[float]) -> list[float]:
    """The scales the guard measures: ``s ** a`` (exactly 1.0 for ``a = 0`` and exactly ``s`` for ``a = 1``)."""
    return [1.0 if a == 0 else (s if a == 1 else float(s ** a)) for a in exponents]


def pick(exponents: Sequence[float], losses: Sequence[float]) -> int:
    """Index of the lowest loss; ties go to the exponent nearest the paper's (1), then the smaller one."""
    return min(range(len(losses)), key=lambda i: (losses[i], abs(exponents[i] - 1.0), exponents[i]))


def parabola(points: Mapping[float, float]) -> tuple[float, float, float]:
    """Least-squares ``(c2, c1, c0)`` of ``loss = c2 a^2 + c1 a + c0`` through the measured ``{a: loss}``
    (at least three distinct points; exact through three). Losses are centred first: they differ in the third
    decimal of numbers near 4, which float64 normal equations would otherwise round."""
    a = torch.tensor(list(points), dtype=torch.float64)
    y = torch.tensor(list(points.values()), dtype=torch.float64)
    mean = y.mean()
    design = torch.stack([a * a, a, torch.ones_like(a)], dim=1)
    c = torch.linalg.lstsq(design, (y - mean).unsqueeze(1)).solution.squeeze(1)
    return float(c[0]), float(c[1]), float(c[2] + mean)


def next_exponents(grid: Sequence[float], measured: Mapping[float, float]) -> list[float]:
    """The exponents to measure next (none: the search is over), given the losses measured so far.

    0 and 1 first (the decision's two ends, always reported). Then the grid point just past the better of them
    (past 1 when the paper's scale is not worse, below 0 otherwise), or, when the grid has none, the one nearest
    the middle of [0, 1]. From three points on, the grid point the fitted parabola puts lowest, until that point
    is measured; a parabola that is not convex (noise, a flat curve) falls back to the unmeasured neighbours of
    the best point measured (a local search, which also ends on a unimodal curve).
    """
    pts = sorted(grid)
    todo = [a for a in (0.0, 1.0) if a not in measured]
    if todo:
        return todo
    left = [a for a in pts if a not in measured]
    if not left:
        return []
    if len(measured) == 2:
        better_paper = measured[1.0] <= measured[0.0]
        past = [a for a in left if a > 1.0] if better_paper else [a for a in left if a < 0.0]
        if past:
            return [min(past) if better_paper else max(past)]
        inside = [a for a in left if 0.0 < a < 1.0]
        return [min(inside, key=lambda a: (abs(a - 0.5), a))] if inside else []
    c2, c1, c0 = parabola(measured)
    if c2 > 0:
        best = min(pts, key=lambda a: (c2 * a * a + c1 * a + c0, abs(a - 1.0), a))
        return [best] if best not in measured else []
    keys = list(measured)
    top = keys[pick(keys, [measured[a] for a in keys])]
    i = pts.index(top)
    return [pts[j] for j in (i - 1, i + 1) if 0 <= j < len(pts) and pts[j] not in measured]


@dataclass
class GuardResult:
    """What the guard measured for one removal and what it chose (``chosen`` indexes ``exponents``).

    ``exponents`` / ``scales`` / ``losses``: the candidates measured, in exponent order (a subset of ``grid``);
    ``windows`` of ``of_windows`` calibration windows and ``tokens`` scored tokens per candidate (every
    ``stride``-th position), in ``rounds`` rounds of the search. The losses are the mean NLL on those tokens (the
    calibration NLL when the whole set was measured)."""

    measured_scale: float
    exponents: list[float]
    scales: list[float]
    losses: list[float]
    chosen: int
    grid: list[float] = field(default_factory=list)
    windows: int = 0
    of_windows: int = 0
    tokens: int = 0
    stride: int = 1
    rounds: int = 1
    search: str = "grid"
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
            "grid": list(self.grid or self.exponents),
            "measured": {"search": self.search, "windows": self.windows, "of_windows": self.of_windows,
                         "tokens": self.tokens, "stride": self.stride, "candidates": len(self.exponents),
                         "rounds": self.rounds},
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
    m = doc.get("measured")
    if m and m["windows"] < m["of_windows"]:
        text += f" (on {m['windows']} of {m['of_windows']} windows, {m['candidates']} of {len(doc['grid'])} exponents)"
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


def first_windows(streams: Sequence[Tensor], n: int) -> list[Tensor]:
    """The first ``n`` windows of a per-batch stream, as views in the same batches (the last one cut short)."""
    out: list[Tensor] = []
    left = n
    for x in streams:
        if left <= 0:
            break
        out.append(x[:left])
        left -= x.shape[0]
    return out


def guard_tail(s: float, grid: Sequence[float], layer_at: Callable[[int], nn.Module], first: int, last: int,
               streams: Sequence[Tensor], kwargs: Sequence[Sequence[dict]], batches: Sequence[Tensor],
               head: Callable[[Tensor, Tensor, int], tuple[float, int]], *, budget: GuardBudget, of_windows: int,
               group: Callable[[int], int] | None = None,
               release: Callable[[nn.Module], None] | None = None) -> GuardResult:
    """The guard's search for a gap whose stream entering layer ``first`` is ``streams`` (the measured windows
    only, per batch; ``kwargs`` / ``batches`` alike): each round measures :func:`next_exponents` with
    :func:`tail_losses` (``group(k)``: work items per pass over the tail for ``k`` candidates; default one
    batch's candidates at a time); ``head(x, ids, stride)`` scores the positions ``budget`` says. Shared by the
    in-memory and the layer-streamed guard, so both decide alike."""
    stride = budget.positions(of_windows, int(batches[0].shape[1]))
    measured: dict[float, float] = {}
    rounds = 0
    todo = list(grid) if budget.search == "grid" else next_exponents(grid, measured)
    while todo:
        scales = candidate_scales(s, todo)
        losses = tail_losses(layer_at, first, last, streams, kwargs, batches, scales,
                             lambda x, b: head(x, b, stride),
                             group=None if group is None else group(len(scales)), release=release)
        measured.update(zip(todo, losses, strict=True))
        rounds += 1
        todo = [] if budget.search == "grid" else next_exponents(grid, measured)
    exponents = sorted(measured)
    losses = [measured[a] for a in exponents]
    return GuardResult(measured_scale=s, exponents=exponents, scales=candidate_scales(s, exponents), losses=losses,
                       chosen=pick(exponents, losses), grid=list(grid), windows=sum(b.shape[0] for b in batches),
                       of_windows=of_windows, tokens=sum(b[:, 1:][:, ::stride].numel() for b in batches),
                       stride=stride, rounds=rounds, search=budget.search)


def guard_in_memory(model: nn.Module, ids: Tensor, current: int, s: float, exponents: Sequence[float], *,
                    batch_size: int, cached: tuple[list[Tensor], list[list[dict]]] | None = None,
                    budget: GuardBudget = DEFAULT_BUDGET) -> GuardResult:
    """The guard for removing layer ``current`` (still present) of an in-memory model, on the first
    ``budget.windows`` windows of ``ids``: their stream at the gap from ``cached`` (an incremental scanner's
    boundary) or a partial forward of just those windows, their layer kwargs from a catch pass over them (the
    embedding lookups: a cut-short last batch needs its own)."""
    adapter = get_adapter(model)
    layers = decoder_layers(model, adapter)
    n = budget.windows(ids.shape[0], ids.shape[1])
    sub = ids[:n]
    if cached is not None:
        streams = first_windows(cached[0], n)
        kwargs = cached[1] if n == ids.shape[0] else catch_layer_inputs(model, sub, batch_size).kwargs
    else:
        streams, kwargs = gap_stream(model, sub, current, batch_size=batch_size)
    batches = [sub[i : i + batch_size] for i in range(0, n, batch_size)]
    if [x.shape[0] for x in streams] != [b.shape[0] for b in batches]:
        raise ValueError("the cached stream at the gap is batched differently from batch_size")
    return guard_tail(s, exponents, layers.__getitem__, current + 1, len(layers), streams, kwargs, batches,
                      lambda x, b, k: head_nll(model, x, b, adapter, stride=k), budget=budget,
                      of_windows=ids.shape[0])
