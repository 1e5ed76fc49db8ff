"""Block reconstruction beside a gap (``reconstruct=before|after|both``): after a layer is removed, fine-tune every
weight of the remaining layer(s) next to the gap so that, fed the pruned model's own stream, they write the stream
the removed layer left. The fit is in place and full rank, so the pruned model is still a plain HF model with no
run-time cost.

Why: the gap scale fixes one number and the refinement gains one per channel; on the quality protocol both
plateau. One layer's forward and backward cost about a model's depth less than the whole model's, so
a local fit can afford many more steps per token than any global one, and it needs no teacher: the target is the
model's own stream before the removal (the output of the removed layer, or of the layer after it), read in the
same pass that feeds the fit. Measured on SmolLM2-135M (``bench/refine_variants.py``): the local fit alone after
each removal beats the local fit followed by the gains.

Split as everywhere: :func:`relative_error` and :func:`fit_layers` are the math on cached streams;
:func:`capture_gap` (one partial pass before the removal) and :func:`reconstruct` (the fit after it) are the
machinery the loop calls.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from prunecomp.errors import PrunecompError
from prunecomp.models.adapters import decoder_layers
from prunecomp.models.hooks import _hidden_out
from prunecomp.models.sequential import catch_layer_inputs, run_layer

__all__ = ["FitErrors", "GapStreams", "HeldOut", "ReconstructReport", "capture_gap", "describe", "effective_side",
           "fit_layers", "layer_tensors", "reconstruct", "reconstruct_layers", "relative_error",
           "tf32_matmuls"]



def relative_error(h: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of ``h`` against ``y`` (``[b, T, d]``) over positions 1.., relative to ``y``'s mean
    squared norm there. Position 0 is left out: it is the attention sink, whose norm is orders of magnitude above
    the rest and would be all the loss sees."""
    h, y = h[:, 1:].float(), y[:, 1:].float()
    return ((h - y) ** 2).sum(-1).mean() / (y**2).sum(-1).mean()


def _float32(obj: Any) -> Any:
    """``obj`` (layer kwargs) with every floating tensor in float32, so a float32 copy of a layer accepts them."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_float32(o) for o in obj)
    if isinstance(obj, list):
        return [_float32(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    return obj


def _through(layers: Sequence[nn.Module], x: Tensor, kwargs: Sequence[dict]) -> Tensor:
    for layer, kw in zip(layers, kwargs, strict=True):
        x = _hidden_out(layer(x, **kw))
    return x


@contextmanager
def tf32_matmuls(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 matmuls and convolutions at the TF32 rate while the block runs (7x the float32 rate on an
    H100: products with a 10-bit mantissa, float32 accumulation, float32 master weights and Adam state), restored
    after; nothing on other devices. Why: the fits train float32 copies of the layers, and PyTorch's default
    float32 matmul precision on CUDA is full float32, which made them 81% of the best level's projected time on an
    8B model (docs/BENCHMARKS.md). A fit is judged by its own error before and after, both measured inside."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


class HeldOut(NamedTuple):
    """The same streams as a fit's, on held-out windows it does not train on: ``xs[b]`` into the first fitted
    layer, ``ys[b]`` the target, ``kwargs[b][j]`` layer ``j``'s kwargs."""

    xs: list[Tensor]
    ys: list[Tensor]
    kwargs: list[list[dict]]


class FitErrors(NamedTuple):
    """A local fit's mean :func:`relative_error` before and after on the windows it trained on, and on the held-out
    windows (None without them). ``kept``: whether the fitted weights were copied back."""

    before: float
    after: float
    check_before: float | None = None
    check_after: float | None = None

    @property
    def kept(self) -> bool:
        return self.after < self.before and (self.check_after is None or self.check_after < self.check_before)


def fit_layers(layers: Sequence[nn.Module], xs: Sequence[Tensor], ys: Sequence[Tensor],
               kwargs: Sequence[Sequence[dict]], *, steps: int, lr: float,
               generator: torch.Generator, check: HeldOut | None = None) -> FitErrors:
    """Fit every parameter of ``layers`` (applied in order) so that ``xs[b]`` maps to ``ys[b]`` (one cached batch
    per step, in a random order from ``generator``); ``kwargs[b][j]``: layer ``j``'s kwargs for batch ``b``.

    Adam at ``lr`` with cosine decay to a tenth, on float32 copies of the layers (a bf16 weight cannot take a small
    Adam step), copied back in the layers' own dtype at the end only when that lowers the mean
    :func:`relative_error` over all batches (a fit that does not help is declined, like the guard's scales) and,
    given ``check``, over the held-out batches too: a fit of every weight of a layer on a few dozen windows can
    learn those windows rather than the gap, which only windows it never saw can tell. Both are judged on the
    float32 copies, before the copy back into the layers' dtype. Returns the errors (in-sample after = before and no
    held-out after when the fitting windows already decline it). On CUDA the float32 matmuls run in TF32
    (:func:`tf32_matmuls`)."""
    if steps < 1 or not xs:
        raise PrunecompError(f"a local fit needs steps >= 1 and at least one batch, got {steps} and {len(xs)}")
    device = next((p.device for layer in layers for p in layer.parameters()), xs[0].device)
    with tf32_matmuls(device):
        return _fit(layers, xs, ys, kwargs, steps=steps, lr=lr, generator=generator, check=check)


def _fit(layers: Sequence[nn.Module], xs: Sequence[Tensor], ys: Sequence[Tensor],
         kwargs: Sequence[Sequence[dict]], *, steps: int, lr: float,
         generator: torch.Generator, check: HeldOut | None) -> FitErrors:
    work = [copy.deepcopy(layer).float().train(False) for layer in layers]
    kws = [[_float32(kw) for kw in per] for per in kwargs]
    check_kws = None if check is None else [[_float32(kw) for kw in per] for per in check.kwargs]
    params = [p for layer in work for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)

    def error(b: int) -> Tensor:
        return relative_error(_through(work, xs[b].float(), kws[b]), ys[b])

    def held_out() -> float | None:
        if check is None or check_kws is None:
            return None
        return float(torch.stack([relative_error(_through(work, x.float(), kw), y)
                                  for x, y, kw in zip(check.xs, check.ys, check_kws, strict=True)]).mean())

    with torch.no_grad():
        before = float(torch.stack([error(b) for b in range(len(xs))]).mean())
        check_before = held_out()
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    order: list[int] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(len(xs), generator=generator).tolist()
        loss = error(order.pop())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        after = float(torch.stack([error(b) for b in range(len(xs))]).mean())
        if not after < before:  # declined on its own windows: the held-out error is not measured again
            return FitErrors(before, before, check_before, None)
        done = FitErrors(before, after, check_before, held_out())
        if done.kept:
            for layer, fitted in zip(layers, work, strict=True):
                for p, q in zip(layer.parameters(), fitted.parameters(), strict=True):
                    p.copy_(q.to(p.dtype))
    return done


@dataclass
class GapStreams:
    """What a local fit needs, read before the removal: the stream entering the first layer to fit (``xs``, per
    batch, as it was before the removal), the stream to reproduce (``ys``), and each fitted layer's kwargs
    (``kwargs[b][j]``); ``side`` and the removed layer's index ``current`` (before the removal); ``check``: the same
    on held-out windows, on which the fit must lower the error too (None: decided on the fitting windows alone)."""

    side: str
    current: int
    xs: list[Tensor]
    ys: list[Tensor]
    kwargs: list[list[dict]]
    check: HeldOut | None = None

    def fitted(self) -> list[int]:
        """Indices, in the model AFTER the removal, of the layers the fit trains."""
        return {"before": [self.current - 1], "after": [self.current],
                "both": [self.current - 1, self.current]}[self.side]


def effective_side(side: str, current: int, n_layers: int) -> str | None:
    """The side a fit beside layer ``current`` of ``n_layers`` can use: ``side`` when those neighbours exist, else
    the neighbour there is (the first layer has none before it, the last none after it); None without any."""
    has_before, has_after = current > 0, current < n_layers - 1
    if side == "both" and has_before and has_after:
        return "both"
    if side in ("before", "both") and has_before:
        return "before" if side == "before" or not has_after else "both"
    if has_after:
        return "after"
    return "before" if has_before else None


@torch.no_grad()
def capture_gap(model: nn.Module, current: int, ids: Tensor, side: str, *, batch_size: int = 4,
                check: Tensor | None = None, layer_at: Callable[[int], nn.Module] | None = None,
                release: Callable[[nn.Module], None] | None = None) -> GapStreams | None:
    """One partial pass (it stops after the last layer needed) over ``ids`` while layer ``current`` is still
    there. ``before``: input of layer ``current - 1``, target the removed layer's output. ``after``: input of the
    removed layer (what the next layer reads once it is gone), target the next layer's output. ``both``: input of
    ``current - 1``, target the next layer's output. Where a side has no layer the other one is fitted (see
    :func:`effective_side`; the result says which); None for a model of one layer. ``check``: held-out windows
    whose streams the same pass reads (each layer is loaded once for both), for the fit's keep-or-decline.

    ``layer_at(j)`` / ``release(layer)``: how a layer-streamed model loads and frees layer ``j`` (default: the
    model's own layers, in memory)."""
    layers = decoder_layers(model)
    side = effective_side(side, current, len(layers))  # type: ignore[assignment]
    if side is None:
        return None
    first = current - 1 if side in ("before", "both") else current
    last_out = current + 1 if side in ("after", "both") else current  # the target: the output of this layer
    caught = catch_layer_inputs(model, ids, batch_size)
    held = None if check is None else catch_layer_inputs(model, check, batch_size)
    xs, h = None, caught.hidden
    check_xs, ch = None, None if held is None else held.hidden
    for j in range(last_out + 1):
        if j == first:
            xs, check_xs = h, ch
        layer = layers[j] if layer_at is None else layer_at(j)
        h = run_layer(layer, h, [kw[j] for kw in caught.kwargs])
        if held is not None:
            ch = run_layer(layer, ch, [kw[j] for kw in held.kwargs])
        if release is not None:
            release(layer)
    fitted = [j for j in (current - 1, current + 1) if (j < current and side != "after") or
              (j > current and side != "before")]
    assert xs is not None
    held_out = None
    if held is not None:
        assert check_xs is not None and ch is not None
        held_out = HeldOut(xs=check_xs, ys=ch, kwargs=[[per[j] for j in fitted] for per in held.kwargs])
    return GapStreams(side=side, current=current, xs=xs, ys=h,
                      kwargs=[[per[j] for j in fitted] for per in caught.kwargs], check=held_out)


@dataclass
class ReconstructReport:
    """What one local fit did: the layers fitted (ORIGINAL indices), the stream reproduced (the output of original
    layer ``target``), the error before and after, on the fitting windows and (``check_windows`` > 0) on
    held-out ones, whether it was kept (declined when it does not lower the error on both: the layers are left as
    they were), and its cost."""

    side: str
    layers: list[int]
    target: int
    steps: int
    lr: float
    windows: int
    loss_before: float
    loss_after: float
    seconds: float
    kept: bool = True
    check_windows: int = 0
    check_loss_before: float | None = None
    check_loss_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(rec: dict[str, Any]) -> str:
    """One step's reconstruction (:meth:`ReconstructReport.to_dict`) in words, for the CLI and run reports."""
    n, c0, c1 = rec.get("check_windows") or 0, rec.get("check_loss_before"), rec.get("check_loss_after")
    if not rec.get("kept", True):
        if n and rec["loss_after"] < rec["loss_before"]:
            return (f"reconstruction of layer(s) {rec['layers']} declined: it lowered the relative error on its "
                    f"{rec['windows']} fitting windows ({rec['loss_before']:.4f} -> {rec['loss_after']:.4f}) but not "
                    f"on {n} held-out windows ({c0:.4f} -> {c1:.4f}); the layers are left as they were")
        return (f"reconstruction of layer(s) {rec['layers']} declined: {rec['steps']} steps did not lower the relative "
                f"error {rec['loss_before']:.4f}; the layers are left as they were")
    held = f", held-out {c0:.4f} -> {c1:.4f} on {n} windows" if n else ""
    return (f"reconstructed layer(s) {rec['layers']} ({rec['side']}) to write layer {rec['target']}'s output stream: "
            f"relative error {rec['loss_before']:.4f} -> {rec['loss_after']:.4f}{held} ({rec['steps']} steps on "
            f"{rec['windows']} windows, {rec['seconds']:.0f} s)")


def layer_tensors(model: nn.Module, indices: Sequence[int]) -> dict[str, Tensor]:
    """The parameters of decoder layers ``indices`` by their name in ``model`` (the recipe's record of a fit), as
    CPU copies: a run keeps every step's until its recipe is written, which on a GPU would hold device memory."""
    layers = decoder_layers(model)
    prefix = {id(layers[i]): i for i in indices}
    out = {}
    for name, module in model.named_modules():
        if id(module) in prefix:
            for pname, p in module.named_parameters():
                out[f"{name}.{pname}"] = p.detach().to("cpu", copy=True)
    return out


def reconstruct(model: nn.Module, gap: GapStreams, scale: float, *, steps: int, lr: float, seed: int,
                removed: int, originals: Sequence[int]) -> ReconstructReport:
    """Fit the layer(s) beside the gap ``gap`` describes, in ``model`` after the removal and the fold of ``scale``
    upstream (the stream before the gap is the old one times ``scale``: every writer there was multiplied by it
    and every reader normalises); kept only when it lowers the error on ``gap.check``'s held-out windows too, when
    there are some. ``removed``: the removed layer's original index; ``originals``: the original
    indices of ``model``'s layers now (for the report)."""
    layers = decoder_layers(model)
    return reconstruct_layers([layers[j] for j in gap.fitted()], gap, scale, steps=steps, lr=lr, seed=seed,
                              removed=removed, originals=originals)


def reconstruct_layers(layers: Sequence[nn.Module], gap: GapStreams, scale: float, *, steps: int, lr: float,
                       seed: int, removed: int, originals: Sequence[int]) -> ReconstructReport:
    """:func:`reconstruct` on the layers ``gap.fitted()`` names, given as modules (a layer-streamed model loads
    them for the fit and keeps them when the report says ``kept``)."""
    t0 = time.perf_counter()
    xs = [x * scale for x in gap.xs] if scale != 1.0 else gap.xs
    check = gap.check
    if check is not None and scale != 1.0:
        check = check._replace(xs=[x * scale for x in check.xs])
    fit = fit_layers(layers, xs, gap.ys, gap.kwargs, steps=steps, lr=lr,
                     generator=torch.Generator().manual_seed(seed), check=check)
    target = removed if gap.side == "before" else originals[gap.current]
    return ReconstructReport(side=gap.side, layers=[originals[j] for j in gap.fitted()], target=target, steps=steps,
                             lr=lr, windows=sum(x.shape[0] for x in gap.xs), loss_before=fit.before,
                             loss_after=fit.after, seconds=time.perf_counter() - t0, kept=fit.kept,
                             check_windows=0 if check is None else sum(x.shape[0] for x in check.xs),
                             check_loss_before=fit.check_before, check_loss_after=fit.check_after)
