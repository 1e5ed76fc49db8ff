"""Least-squares correction of the gap, as pure tensor functions (the math of ``compensation="lsq"``).

Removing layer ``l`` hands layer ``l+1`` the stream ``x_in`` instead of ``x_out``. Magnitude compensation scales
everything upstream by ``s``. On top of it, ``lsq`` re-maps the output ``m`` of the last linear residual writer
before the gap (``down_proj`` of layer ``l-1``) by a ``C x C`` matrix ``T`` fitted on calibration tokens so that the
stream reaching layer ``l+1`` best matches what it used to receive:

    s * (x_in - m) + s * m T  ~=  x_out      =>      m T ~= x_out / s - x_in + m   (= target)

``T`` is solved in closed form (ridge-regularised normal equations, streamed over batches) and folded into the
writer's weight and bias, so the pruned model is still a plain HF model with no extra run-time work. ``T = I`` is
plain magnitude compensation, so the fit can only lower the calibration error of the stream at the gap.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "NormalEquations",
    "accumulate_normal_equations",
    "fold_output_map",
    "lsq_error",
    "lsq_target",
    "solve_ridge",
]

NormalEquations = tuple[Tensor, Tensor, float, int]
"""``(M^T M, M^T Y, ||Y||^2, rows)`` in float64: enough to solve and to score any ``T`` without the rows."""


def lsq_target(m: Tensor, x_in: Tensor, x_out: Tensor, s: float) -> Tensor:
    """What ``m T`` should equal for the compensated stream to reproduce ``x_out`` (see module docstring)."""
    return x_out.double() / s - x_in.double() + m.double()


def accumulate_normal_equations(state: NormalEquations | None, m: Tensor, y: Tensor) -> NormalEquations:
    """Add a batch of rows (``[..., C]``) to the running normal equations."""
    m2, y2 = m.reshape(-1, m.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    mtm, mty, yty = m2.T @ m2, m2.T @ y2, float((y2 * y2).sum())
    if state is None:
        return mtm, mty, yty, m2.shape[0]
    return state[0] + mtm, state[1] + mty, state[2] + yty, state[3] + m2.shape[0]


def lsq_error(state: NormalEquations, t: Tensor) -> float:
    """``||M T - Y||^2`` from the normal equations: ``tr(T^T M^T M T) - 2 tr(T^T M^T Y) + ||Y||^2``."""
    mtm, mty, yty, _ = state
    t = t.double()
    return float((t * (mtm @ t)).sum() - 2.0 * (t * mty).sum() + yty)


def solve_ridge(state: NormalEquations, ridge: float = 1e-3) -> Tensor:
    """``argmin_T ||M T - Y||^2 + lam ||T - I||^2`` with ``lam = ridge * mean(diag(M^T M))``.

    Shrinking towards the identity (not zero) means a weakly determined direction keeps plain magnitude
    compensation instead of being zeroed.
    """
    mtm, mty = state[0], state[1]
    eye = torch.eye(mtm.shape[0], dtype=mtm.dtype, device=mtm.device)
    lam = ridge * float(mtm.diagonal().mean())
    return torch.linalg.solve(mtm + lam * eye, mty + lam * eye)


def fold_output_map(weight: Tensor, bias: Tensor | None, t: Tensor) -> tuple[Tensor, Tensor | None]:
    """A linear layer ``y = x W^T + b`` followed by ``y T`` as one linear layer: ``W' = T^T W``, ``b' = b T``."""
    tt = t.to(torch.float64)
    new_w = (tt.T @ weight.double()).to(weight.dtype)
    new_b = None if bias is None else (bias.double() @ tt).to(bias.dtype)
    return new_w, new_b
