"""Machinery of ``compensation="lsq"``: one partial calibration pass to fit the gap map, then the fold.

The pass stops right after the layer being removed (nothing downstream is computed) and streams the normal
equations batch by batch; the math lives in :mod:`prunecomp.method.fitting`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunecomp.method import fitting as F
from prunecomp.method.compensation import is_tied
from prunecomp.models.adapters import ArchAdapter, decoder_layers, get_adapter, resolve
from prunecomp.models.hooks import capture_layer_io

__all__ = ["GapFit", "apply_gap_map", "fit_gap_map", "gap_map_tensors"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass(frozen=True)
class GapFit:
    """The fitted map and how much it lowered the calibration error at the gap (vs ``T = I``)."""

    t: Tensor
    error_before: float
    error_after: float


def _writer(model: nn.Module, adapter: ArchAdapter, current: int) -> nn.Module | None:
    """The linear module whose output is the last write into the stream before layer ``current``."""
    if adapter.lsq_writer is None:
        return None
    if current == 0:
        return None if is_tied(model, adapter) else resolve(model, adapter.embed)
    return resolve(decoder_layers(model, adapter)[current - 1], adapter.lsq_writer)


@torch.no_grad()
def fit_gap_map(model: nn.Module, ids: Tensor, current: int, s: float, *, ridge: float = 1e-3,
                batch_size: int = 4) -> GapFit | None:
    """Fit ``T`` for removing layer ``current`` (not yet removed) with magnitude scale ``s``; ``None`` when the
    architecture has no linear writer before the gap (sandwich norms, or a tied embedding before layer 0)."""
    adapter = get_adapter(model)
    writer = _writer(model, adapter, current)
    if writer is None:
        return None
    layers = decoder_layers(model, adapter)
    device = next(model.parameters()).device
    state: F.NormalEquations | None = None
    captured: dict[str, Tensor] = {}

    def on_write(_m: nn.Module, _a: tuple, out: Tensor) -> None:
        captured["m"] = out.detach()

    def on_layer(i: int, x_in: Tensor, x_out: Tensor) -> None:
        nonlocal state
        if i != current:
            return
        m = captured["m"]
        y = F.lsq_target(m, x_in, x_out, s)
        state = F.accumulate_normal_equations(state, m, y)
        raise _Stop

    handle = writer.register_forward_hook(on_write)
    try:
        with capture_layer_io(layers, on_layer):
            for start in range(0, ids.shape[0], batch_size):
                with contextlib.suppress(_Stop):  # the pass stops after the removed layer
                    model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    assert state is not None
    t = F.solve_ridge(state, ridge)
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    return GapFit(t=t, error_before=F.lsq_error(state, eye), error_after=F.lsq_error(state, t))


def gap_map_tensors(model: nn.Module, current: int) -> list[Tensor]:
    """The tensors :func:`apply_gap_map` writes for a gap at ``current`` (layer already removed)."""
    writer = _writer(model, get_adapter(model), current)
    return [] if writer is None else list(writer.parameters(recurse=False))


@torch.no_grad()
def apply_gap_map(model: nn.Module, current: int, fit: GapFit) -> None:
    """Fold ``fit.t`` into the writer before the gap; ``current`` indexes the pruned model (layer already gone)."""
    adapter = get_adapter(model)
    writer = _writer(model, adapter, current)
    assert writer is not None
    if isinstance(writer, nn.Embedding):  # rows are the written vectors: E' = E T
        writer.weight.copy_((writer.weight.double() @ fit.t.double()).to(writer.weight.dtype))
        return
    new_w, new_b = F.fold_output_map(writer.weight, writer.bias, fit.t)
    writer.weight.copy_(new_w)
    if new_b is not None:
        writer.bias.copy_(new_b)
