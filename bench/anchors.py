"""The strongest published training-free fixes, as named baselines for bench/quality.py, built from
the library's machinery (block scores, layer-at-a-time forwards, the lsq normal equations and fold).

* ReplaceMe (Shopkhoev et al. 2025, github.com/mts-ai/ReplaceMe, ``lstsq`` method): remove the contiguous block
  of k layers whose input and output are most alike (cosine), fit one C x C map T by least squares so that the MLP
  output m of the layer before the block, times T, reproduces what the block added (``m T ~ x_out - x_in + m``,
  no magnitude scale), and fold T into that layer's ``down_proj``. Zero run-time cost: prunecomp's ``lsq`` without
  the scale and for a whole block at once.
* LinearPatch (Chen et al., NeurIPS 2025, github.com/chenxinrui-tsinghua/LinearPatch): the same block choice, then
  a patch ``P = H diag(d) H^T`` applied to the stream at the cut, with H a Hadamard matrix and ``d`` the per-channel
  ratio of mean |x_out H| to mean |x_in H| (averaged per batch, as the official ``get_scale_params``). **It adds a
  run-time C x C matrix multiply** at the cut (a module in the model here, so the weights hash sees it); its
  optional logit distillation of P is not run here.
* Ghosted Layers (arXiv 2605.15491), as read here: iterative Block Influence removal, and at every cut the removed
  layer is replaced by its closed-form least-squares linear "ghost": a C x C map T fitted in float64 (ridge normal
  equations, shrunk towards the identity) so that the stream the current model sends the layer, times T,
  reproduces the stream the layer wrote (``x_in T ~ x_out``). **It adds a run-time C x C matrix multiply per cut**
  (a module in the model here, as LinearPatch's), so it is a baseline for quality, not a zero-overhead method.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from prunecomp.method import fitting as F
from prunecomp.method.lsq import GapFit, apply_gap_map
from prunecomp.method.scoring import scan_layers
from prunecomp.models.adapters import decoder_layers, get_adapter, resolve
from prunecomp.models.pruning import remove_layer
from prunecomp.models.sequential import catch_layer_inputs, run_layer

__all__ = ["ghosted_layers", "hadamard", "linear_patch", "replace_me"]


def _paley(q: int) -> Tensor:
    """Hadamard matrix of order q + 1 for a prime q = 3 mod 4 (Paley construction I)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def _pm1_hadamard(n: int) -> Tensor:
    """A +-1 Hadamard matrix of order n from Kronecker products of orders 2, 12 and 20 (ValueError if none)."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    for size, block in ((2, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)), (12, None), (20, None)):
        if n % size:
            continue
        try:
            rest = _pm1_hadamard(n // size)
        except ValueError:
            continue
        return torch.kron(rest, block if block is not None else _paley(size - 1))
    raise ValueError(f"no Hadamard construction here for order {n}")


def hadamard(n: int) -> Tensor:
    """An orthonormal Hadamard matrix of order n (float64)."""
    h = _pm1_hadamard(n)
    assert torch.allclose(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    return h / math.sqrt(n)


def _block(model: nn.Module, ids: Tensor, k: int, batch_size: int) -> int:
    """Start of the contiguous block of k layers (last layer kept) whose input and output are most alike."""
    n = len(decoder_layers(model))
    scan = scan_layers(model, ids, "block", batch_size=batch_size, block_size=k)
    return min(range(n - k), key=lambda i: (scan.scores[i], i))


@torch.no_grad()
def _streams(model: nn.Module, ids: Tensor, start: int, end: int, batch_size: int,
             writer: nn.Module | None) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per batch: the stream entering layer ``start``, the one leaving layer ``end - 1`` and (``writer`` given) the
    output of ``writer`` in layer ``start - 1``."""
    layers = decoder_layers(model)
    caught = catch_layer_inputs(model, ids, batch_size)
    xs, ms = caught.hidden, []
    captured: list[Tensor] = []
    for j in range(end):
        if j == start:
            x_in = xs
        if j == start - 1 and writer is not None:
            handle = writer.register_forward_hook(lambda _m, _a, out: captured.append(out.detach()))
            try:
                xs = run_layer(layers[j], xs, [kw[j] for kw in caught.kwargs])
            finally:
                handle.remove()
            ms = captured
            continue
        xs = run_layer(layers[j], xs, [kw[j] for kw in caught.kwargs])
    return x_in, xs, ms


def replace_me(model: nn.Module, ids: Tensor, k: int, *, batch_size: int = 4, ridge: float = 1e-6) -> dict[str, Any]:
    """ReplaceMe (lstsq) on ``model`` in place; returns the removed layers and the fit's error reduction."""
    adapter = get_adapter(model)
    start = max(_block(model, ids, k, batch_size), 1)  # a layer before the block carries the map
    writer = resolve(decoder_layers(model)[start - 1], adapter.lsq_writer)
    x_in, x_out, ms = _streams(model, ids, start, start + k, batch_size, writer)
    state = None
    for m, a, b in zip(ms, x_in, x_out, strict=True):
        state = F.accumulate_normal_equations(state, m, F.lsq_target(m, a, b, 1.0))
    assert state is not None
    t = F.solve_ridge(state, ridge)
    eye = torch.eye(t.shape[0], dtype=t.dtype)
    for i in reversed(range(start, start + k)):
        remove_layer(model, i)
    apply_gap_map(model, start, GapFit(t=t, error_before=0.0, error_after=0.0))
    return {"removed": list(range(start, start + k)), "fit_error_before": F.lsq_error(state, eye),
            "fit_error_after": F.lsq_error(state, t)}


class _Patch(nn.Module):
    """LinearPatch's run-time matrix at the cut: ``x -> x P`` on the output of the layer before it."""

    def __init__(self, p: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(p.float(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() @ self.weight).to(x.dtype)


def linear_patch(model: nn.Module, ids: Tensor, k: int, *, batch_size: int = 4) -> dict[str, Any]:
    """LinearPatch (Hadamard rotation + channel-wise scaling, no distillation) on ``model`` in place."""
    start = max(_block(model, ids, k, batch_size), 1)
    x_in, x_out, _ = _streams(model, ids, start, start + k, batch_size, None)
    h = hadamard(x_in[0].shape[-1]).float()
    d = torch.stack([(b.float() @ h).abs().mean(dim=(0, 1)) / (a.float() @ h).abs().mean(dim=(0, 1))
                     for a, b in zip(x_in, x_out, strict=True)]).mean(0)
    for i in reversed(range(start, start + k)):
        remove_layer(model, i)
    before = decoder_layers(model)[start - 1]
    before.linear_patch = _Patch(h @ torch.diag(d) @ h.T)
    before.register_forward_hook(lambda mod, _a, out: (mod.linear_patch(out[0]), *out[1:])
                                 if isinstance(out, tuple) else mod.linear_patch(out))
    return {"removed": list(range(start, start + k)), "runtime_overhead": "one C x C matmul at the cut"}


class _Ghosts(nn.Module):
    """The ghosts of the layers removed right after a layer, applied in order to its output at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleList()

    def forward(self, x: Tensor) -> Tensor:
        for m in self.maps:
            x = m(x)
        return x


def ghosted_layers(model: nn.Module, ids: Tensor, k: int, *, batch_size: int = 4,
                   ridge: float = 1e-6) -> dict[str, Any]:
    """Ghosted Layers on ``model`` in place: k times, remove the layer of lowest Block Influence (never layer 0:
    its ghost runs on the output of the layer before it) and put its least-squares ghost at the cut. Returns the
    removed layers (original indices) and each fit's relative stream error (identity map vs ghost)."""
    original = list(range(len(decoder_layers(model))))
    removed, errors = [], []
    for _ in range(k):
        n = len(decoder_layers(model))
        scores = scan_layers(model, ids, "bi", batch_size=batch_size).scores
        cut = min(range(1, n), key=lambda i: (scores[i], i))
        x_in, x_out, _ = _streams(model, ids, cut, cut + 1, batch_size, None)
        state = None
        for a, b in zip(x_in, x_out, strict=True):
            state = F.accumulate_normal_equations(state, a, b)
        assert state is not None
        t = F.solve_ridge(state, ridge)
        eye = torch.eye(t.shape[0], dtype=t.dtype)
        errors.append({"before": F.lsq_error(state, eye) / state[2], "after": F.lsq_error(state, t) / state[2]})
        remove_layer(model, cut)
        removed.append(original.pop(cut))
        before = decoder_layers(model)[cut - 1]
        if not hasattr(before, "ghosts"):
            before.ghosts = _Ghosts()
            before.register_forward_hook(lambda mod, _a, out: (mod.ghosts(out[0]), *out[1:])
                                         if isinstance(out, tuple) else mod.ghosts(out))
        before.ghosts.maps.append(_Patch(t))
    return {"removed": removed, "fit_errors": errors, "runtime_overhead": f"{k} C x C matmuls (one per cut)"}
