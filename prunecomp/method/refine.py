"""Refinement after pruning: distil the dense model's next-token distribution into per-channel gains that are
folded into existing weights, so the pruned model stays a plain HF model with no run-time cost.

Why: magnitude compensation fixes one number per gap (the stream's scale). On a small model that recovers only a
fifth of the damage (docs/RESULTS.md); the rest is the *direction* of the stream each later layer and the head now see.
Per-channel gains on every norm output (and, for pre-norm families, on every residual writer's output) are the
cheapest degrees of freedom that can still be folded exactly:

* norm gain ``g`` on ``RMSNorm(x) * (offset + w)``  ->  ``w' = (offset + w) * g - offset``;
* writer gain ``g`` on ``W x + b``  ->  ``W' = diag(g) W``, ``b' = g * b`` (the output rows).

They are fitted with a few dozen Adam steps on the *calibration* windows against the dense model's own
predictions (KL to the teacher's next-token distribution: no labels, no extra data). The teacher is computed once,
before the first removal, and stored sparsely (top-``k`` log-probs in float32 and their indices), so its memory is
``n * T * k * 8`` bytes whatever the vocabulary.

The loss (:func:`distill_loss`, ``loss=``): ``tail`` (the default) is the exact KL over the teacher's top ``k``
tokens plus one bucket for all the others, whose teacher mass is ``1 - sum(top-k probs)``. ``topk`` (sessions
before 15) renormalises the teacher over its top ``k`` and so asks the student for zero mass on every other token:
an overconfident student whose perplexity on real text rises while that loss falls. Measured on SmolLM2-135M
(``bench/quality.py --variants refine-reconstruct``, the same reconstructed states and settings): ``topk`` 52.89 /
61.05 / 83.79 mean perplexity at k = 3 / 5 / 8, ``tail`` 50.70 / 58.74 / 80.83.

The loss before and after the fit (the audit trail's "calibration KL") is measured on at most ``eval_windows``
windows spread over the fitting set (16 by default), not all of them: it decides nothing (the final check and the
gates judge the model), and two passes over every window cost a large share of the refinement's time when the
windows are many. The fit itself sees every window, so the gains do not depend on it.

The gains live in float32 forward hooks during fitting (the model's own weights are frozen, in any dtype) and are
folded at the end; :func:`fold_gains` is exact up to float rounding, which the tests check on saved models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from prunecomp.errors import PrunecompError
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.models.adapters import decoder_layers, get_adapter, resolve

__all__ = [
    "REFINE_LOSSES",
    "REFINE_MODES",
    "Gain",
    "RefineReport",
    "TeacherTargets",
    "audit_rows",
    "distill_loss",
    "fold_gains",
    "gains",
    "refine",
    "teacher_targets",
]

RefineMode = Literal["none", "norms", "norms+writers", "channels"]
REFINE_MODES: tuple[str, ...] = ("none", "norms", "norms+writers", "channels")
REFINE_LOSSES: tuple[str, ...] = ("tail", "topk")


@dataclass
class TeacherTargets:
    """The dense model's top-``k`` next-token log-probs on the calibration windows (``[n, T, k]`` each)."""

    logprobs: Tensor
    indices: Tensor

    @property
    def nbytes(self) -> int:
        return self.logprobs.numel() * self.logprobs.element_size() + self.indices.numel() * 8


@torch.no_grad()
def teacher_targets(model: nn.Module, ids: Tensor, *, topk: int = 256, batch_size: int = 4) -> TeacherTargets:
    """Top-``topk`` next-token log-probs of ``model`` on ``ids`` (``[n, T]``), computed in float32."""
    if topk < 1:
        raise PrunecompError(f"refine_topk must be >= 1, got {topk}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    values, indices = [], []
    try:
        for start in range(0, ids.shape[0], batch_size):
            logits = model(input_ids=ids[start : start + batch_size].to(device), use_cache=False).logits.float()
            top = torch.log_softmax(logits, dim=-1).topk(min(topk, logits.shape[-1]), dim=-1)
            values.append(top.values.cpu())
            indices.append(top.indices.cpu())
    finally:
        model.train(was_training)
    return TeacherTargets(torch.cat(values), torch.cat(indices))


def _check_loss(loss: str) -> None:
    if loss not in REFINE_LOSSES:
        raise PrunecompError(f"refine loss must be one of {', '.join(REFINE_LOSSES)}, got {loss!r}")


def distill_loss(student_logits: Tensor, teacher_logprobs: Tensor, teacher_indices: Tensor, *,
                 loss: str = "tail") -> Tensor:
    """Cross-entropy from the teacher's stored top-``k`` distribution to the student, mean over positions.

    ``tail``: over the ``k`` tokens plus one bucket for the rest of the vocabulary (teacher mass ``1 - sum p``,
    student mass from a log-sum-exp over the other logits, so it is exact however small): ``KL(teacher || student)``
    on that partition up to a constant; with ``k`` = the vocabulary it is the full KL. ``topk``: the teacher
    renormalised over its ``k`` tokens (the tail asked to be zero; kept by name for earlier results).
    """
    _check_loss(loss)
    if loss == "topk":
        p = torch.softmax(teacher_logprobs.float(), dim=-1)
        logq = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_indices)
        return -(p * logq).sum(-1).mean()
    logits = student_logits.float()
    logz = torch.logsumexp(logits, dim=-1)
    p = teacher_logprobs.float().exp()
    ce = -(p * (logits.gather(-1, teacher_indices) - logz[..., None])).sum(-1)
    if teacher_indices.shape[-1] < logits.shape[-1]:  # else no tail: the full KL (and no log-sum-exp over nothing)
        p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
        logq_tail = torch.logsumexp(logits.scatter(-1, teacher_indices, float("-inf")), dim=-1) - logz
        ce = ce - p_tail * logq_tail
    return ce.mean()


@dataclass
class Gain:
    """One trainable per-channel gain on a module's output, and how it folds into that module."""

    module: nn.Module
    value: nn.Parameter
    kind: Literal["norm", "linear"]
    offset: float = 0.0


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, Tensor) and weight.dim() == 1


def gains(model: nn.Module, mode: str) -> list[Gain]:
    """The gains a ``mode`` fits: every norm inside the decoder layers plus the final norm (``norms``), and the
    residual writers' outputs for pre-norm families (``norms+writers``; sandwich-norm writers already are norms),
    and also every other linear's output in the layer (``channels``: q, k, v, gate, up; see
    ``ArchAdapter.inner_linears``)."""
    if mode not in REFINE_MODES or mode == "none":
        raise PrunecompError(f"refine mode must be one of {', '.join(REFINE_MODES[1:])}, got {mode!r}")
    adapter = get_adapter(model)
    out: list[Gain] = []
    seen: set[int] = set()

    def add(module: nn.Module, kind: Literal["norm", "linear"]) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        param = next(module.parameters())
        size = module.weight.shape[0]
        value = nn.Parameter(torch.ones(size, dtype=torch.float32, device=param.device))
        out.append(Gain(module, value, kind, adapter.norm_offset if kind == "norm" else 0.0))

    for layer in decoder_layers(model, adapter):
        for module in layer.modules():
            if _is_norm(module):
                add(module, "norm")
        if mode in ("norms+writers", "channels") and not adapter.writers_are_norms:
            for path in adapter.residual_writers:
                add(resolve(layer, path), "linear")
        if mode == "channels":
            for path in adapter.inner_linears:
                add(resolve(layer, path), "linear")
    add(resolve(model, adapter.final_norm), "norm")
    return out


@contextmanager
def gains_applied(items: list[Gain]) -> Iterator[None]:
    """Multiply each module's output by its gain while the block runs (hooks always removed)."""

    def hook(gain: Gain) -> Any:
        def fn(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor:
            return output * gain.value.to(output.dtype)

        return fn

    handles = [g.module.register_forward_hook(hook(g)) for g in items]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold_gains(items: list[Gain]) -> None:
    """Write each gain into its module's weights (exact: the hooked and the folded model compute the same)."""
    for g in items:
        w = g.module.weight
        value = g.value.detach().to(w.device)
        if g.kind == "norm":
            w.copy_(((w.float() + g.offset) * value - g.offset).to(w.dtype))
        else:
            w.copy_((w.float() * value[:, None]).to(w.dtype))
            bias = getattr(g.module, "bias", None)
            if bias is not None:
                bias.copy_((bias.float() * value).to(bias.dtype))


@dataclass
class RefineReport:
    """What refinement did, for the audit trail."""

    mode: str
    steps: int
    lr: float
    batch_size: int
    topk: int
    loss: str
    parameters: int
    loss_before: float
    loss_after: float
    seconds: float
    loss_windows: int  # how many of the fitting windows loss_before/loss_after are measured on
    losses: list[float] = field(default_factory=list)
    # The keep-or-decline decision on held-out windows (``check``): next-token NLL without and with the gains.
    check_windows: int = 0
    check_loss_before: float | None = None
    check_loss_after: float | None = None
    kept: bool = True
    # What was folded, by module path: (kind, norm offset, gains); the recipe's sidecar, not the JSON report.
    folded: dict[str, tuple[str, float, Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "folded"}


@torch.no_grad()
def _eval_loss(model: nn.Module, ids: Tensor, targets: TeacherTargets, batch_size: int, loss: str,
               rows: Tensor) -> float:
    """Mean :func:`distill_loss` over the windows ``rows`` of ``ids``."""
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(rows), batch_size):
        sel = rows[start:start + batch_size]
        logits = model(input_ids=ids[sel].to(device), use_cache=False).logits
        total += float(distill_loss(logits, targets.logprobs[sel].to(device), targets.indices[sel].to(device),
                                    loss=loss)) * len(sel)
    return total / len(rows)


def audit_rows(n: int, limit: int | None) -> Tensor:
    """Indices of at most ``limit`` of ``n`` windows, spread evenly (windows may come ordered by source); all of
    them when ``limit`` is None or at least ``n``."""
    m = n if limit is None else min(n, limit)
    return torch.arange(m) * n // m


def refine(model: nn.Module, ids: Tensor, targets: TeacherTargets, *, mode: str = "channels", steps: int = 80,
           lr: float = 3e-3, batch_size: int = 2, seed: int = 0, loss: str = "tail", eval_windows: int | None = 16,
           on_step: Callable[[int], None] | None = None, check: Tensor | None = None) -> RefineReport:
    """Fit per-channel gains (see module doc) so ``model`` matches ``targets`` on ``ids``; fold them; report.

    Adam with a cosine decay to 10% of ``lr``; each step uses ``batch_size`` windows drawn without replacement
    from a seeded permutation (a new one each epoch), so the result is reproducible. ``on_step(i)`` runs after
    step ``i`` (from 1) with the gains applied as hooks, i.e. on the model as it would be folded at that point.
    ``loss``: see :func:`distill_loss`. ``eval_windows``: how many windows the reported loss before and after is
    measured on (None: all; see the module doc).

    ``check``: held-out windows (disjoint from ``ids`` and from the final check's) on which the gains must lower the
    next-token NLL of real text to be folded; otherwise they are declined (``kept`` False, nothing folded). A
    distillation fit lowers its own loss on its own windows by construction; on a family where the gains do not
    generalise, this is where the run says so and keeps what was better. None: always folded.
    """
    _check_loss(loss)  # before any forward pass
    if ids.dim() != 2 or targets.logprobs.shape[:2] != ids.shape:
        raise PrunecompError(f"refine: teacher targets of shape {tuple(targets.logprobs.shape[:2])} do not match the "
                             f"calibration windows {tuple(ids.shape)}: compute them on the same windows")
    if steps < 0 or batch_size < 1 or not lr > 0 or (eval_windows is not None and eval_windows < 1):
        raise PrunecompError(f"refine: need steps >= 0, batch_size >= 1, lr > 0, eval_windows >= 1 or None; got "
                             f"{steps}, {batch_size}, {lr}, {eval_windows}")
    rows = audit_rows(ids.shape[0], eval_windows)
    t0 = time.perf_counter()
    items = gains(model, mode)
    device = next(model.parameters()).device
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()  # no dropout: the gains are fitted to the deterministic model
    losses: list[float] = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with gains_applied(items):
            before = _eval_loss(model, ids, targets, batch_size, loss, rows)
            opt = torch.optim.Adam([g.value for g in items], lr=lr)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
            gen = torch.Generator().manual_seed(seed)
            order: list[int] = []
            for _ in range(steps):
                if len(order) < batch_size:
                    order += torch.randperm(ids.shape[0], generator=gen).tolist()
                batch, order = order[:batch_size], order[batch_size:]
                sel = torch.tensor(batch)
                logits = model(input_ids=ids[sel].to(device), use_cache=False).logits
                value = distill_loss(logits, targets.logprobs[sel].to(device), targets.indices[sel].to(device),
                                     loss=loss)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
                losses.append(float(value.detach()))
                if on_step is not None:
                    on_step(len(losses))
            check_after = None if check is None else mean_nll(model, check, batch_size=1)
        check_before = None if check is None else mean_nll(model, check, batch_size=1)
        kept = check_after is None or check_before is None or check_after < check_before
        folded: dict[str, tuple[str, float, Tensor]] = {}
        if kept:
            fold_gains(items)
            names = {id(m): n for n, m in model.named_modules()}
            folded = {names[id(g.module)]: (g.kind, g.offset, g.value.detach().cpu().clone()) for g in items}
        after = _eval_loss(model, ids, targets, batch_size, loss, rows)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return RefineReport(mode=mode, steps=steps, lr=lr, batch_size=batch_size, topk=int(targets.indices.shape[-1]),
                        parameters=sum(g.value.numel() for g in items), loss_before=before, loss_after=after,
                        seconds=time.perf_counter() - t0, loss=loss, loss_windows=len(rows), losses=losses,
                        folded=folded, check_windows=0 if check is None else int(check.shape[0]),
                        check_loss_before=check_before, check_loss_after=check_after, kept=kept)
