"""Incremental re-scoring: cache the residual stream at every layer boundary and, after a removal, re-run only
the layers after the gap.

Why it is exact (up to RMSNorm eps and float rounding): compensation multiplies every residual writer upstream
of the gap by ``s``, so every hidden state upstream of the gap becomes exactly ``s`` times what it was and every
upstream layer computes the same normalized quantities. Cosine-type scores (BI, angular) and magnitude ratios
of upstream layers are scale invariant, so they are kept; the cached upstream streams are rescaled in place; the
layers from the gap on are re-run from the cached (rescaled) stream at the gap. Contiguous-block scores come
straight from two cached boundaries; PPL-on-skip starts each candidate's forward at the candidate's own layer.

Cost per step after the first: the layers after the gap (the minimum any exact method must recompute), instead
of all layers. Memory: ``(layers + 1) x windows x tokens x hidden`` float32 activations; over the budget the
caller falls back to exact scoring. Taylor+ needs gradients through the whole model and is always exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from prunecomp.method import metrics as M
from prunecomp.method.scoring import LayerScan, magnitude_scores
from prunecomp.models.adapters import decoder_layers, get_adapter
from prunecomp.models.sequential import catch_layer_inputs, head_nll, run_layer

__all__ = ["INCREMENTAL_METRICS", "PER_CANDIDATE_METRICS", "IncrementalScanner", "cache_bytes", "candidate_scores"]

INCREMENTAL_METRICS = frozenset({"bi", "angular", "block", "mag", "ppl"})
PER_CANDIDATE_METRICS = frozenset({"ppl"})
"""Metrics whose cost is one forward per candidate: the ones worth fanning out over workers."""


def cache_bytes(model: nn.Module, n_samples: int, seq_len: int) -> int:
    """Bytes the boundary cache of ``model`` needs for ``n_samples`` windows of ``seq_len`` tokens (float32)."""
    hidden = int(model.config.hidden_size)
    return (len(decoder_layers(model)) + 1) * n_samples * seq_len * hidden * 4


class IncrementalScanner:
    """Scores the layers of one model as it is pruned step by step; told about every removal via :meth:`removed`.

    ``streams[j]`` is the residual stream entering current layer ``j`` (one tensor per batch); ``streams[N]`` the
    one leaving the last layer. ``_stats[j]`` holds layer ``j``'s streamed BI / angular / magnitude-ratio sums.
    """

    def __init__(self, model: nn.Module, ids: Tensor, *, batch_size: int,
                 on_batch: Callable[[], None] | None = None) -> None:
        self.model = model
        self.ids = ids
        self.batch_size = batch_size
        self.on_batch = on_batch
        self.streams: list[list[Tensor]] = []
        self._kwargs: list[list[dict]] = []
        self._stats: list[M.LayerStats] = []
        self._dirty_from = 0
        self.layer_forwards = 0

    @property
    def _batches(self) -> list[Tensor]:
        return [self.ids[i : i + self.batch_size] for i in range(0, self.ids.shape[0], self.batch_size)]

    @torch.no_grad()
    def _refresh(self) -> None:
        """Bring the cache up to date with the model: run every layer from the first stale one."""
        layers = decoder_layers(self.model)
        if not self.streams:
            caught = catch_layer_inputs(self.model, self.ids, self.batch_size)
            self.streams, self._kwargs, self._dirty_from = [caught.hidden], caught.kwargs, 0
        del self.streams[self._dirty_from + 1 :]
        del self._stats[self._dirty_from :]
        for j in range(self._dirty_from, len(layers)):
            xs = self.streams[j]
            out = run_layer(layers[j], xs, [kw[j] for kw in self._kwargs])
            stats: M.LayerStats | None = None
            for x_in, x_out in zip(xs, out, strict=True):
                stats = M.accumulate_layer(stats, x_in, x_out, ("bi", "angular"))
            assert stats is not None
            self.streams.append(out)
            self._stats.append(stats)
            self.layer_forwards += self.ids.shape[0]
        if self._dirty_from < len(layers) and self.on_batch is not None:
            for _ in self._batches:
                self.on_batch()
        self._dirty_from = len(layers)

    def scan(self, metric: str, *, block_size: int = 1, candidates: Sequence[int] | None = None) -> LayerScan:
        """Same contract as :func:`prunecomp.method.scoring.scan_layers` for the metrics in
        :data:`INCREMENTAL_METRICS`."""
        if metric not in INCREMENTAL_METRICS:
            raise ValueError(f"metric {metric!r} has no incremental form; use exact scoring")
        before = self.layer_forwards
        self._refresh()
        layers = decoder_layers(self.model)
        n = len(layers)
        scales = [M.layer_scale(st) for st in self._stats]
        if metric in ("bi", "angular"):
            scores = [M.layer_score(st, metric) for st in self._stats]
        elif metric == "block":
            scores = [self._block_score(i, block_size) if i + block_size <= n else float("inf") for i in range(n)]
        elif metric == "mag":
            scores = magnitude_scores(self.model)
        else:
            scores = self._skip_ppl(candidates if candidates is not None else range(n))
        return LayerScan(scores=scores, scales=scales, layer_forwards=self.layer_forwards - before)

    def _block_score(self, start: int, size: int) -> float:
        state = None
        for x_in, x_out in zip(self.streams[start], self.streams[start + size], strict=True):
            state = M.accumulate(state, *M.block_influence_sum(x_in, x_out))
        assert state is not None
        return float(M.mean(state))

    @torch.no_grad()
    def _skip_ppl(self, candidates: Sequence[int]) -> list[float]:
        """SLEB scores: each candidate's forward starts from the cached stream entering it, skipping it."""
        layers = decoder_layers(self.model)
        adapter = get_adapter(self.model)
        scores = [float("inf")] * len(layers)
        for i in candidates:
            total, count = 0.0, 0
            for b, (x, ids) in enumerate(zip(self.streams[i], self._batches, strict=True)):
                for j in range(i + 1, len(layers)):
                    x = run_layer(layers[j], [x], [self._kwargs[b][j]])[0]
                    self.layer_forwards += x.shape[0]
                nll, tokens = head_nll(self.model, x, ids, adapter)
                total += nll
                count += tokens
            scores[i] = float(torch.exp(torch.tensor(total / count)))
        return scores

    @torch.no_grad()
    def removed(self, current: int, scale: float) -> None:
        """Layer ``current`` was removed and ``scale`` folded upstream (1.0 without compensation): drop its cached
        output, rescale the streams upstream of the gap, and re-run everything from the gap at the next scan."""
        if not self.streams:
            return
        del self.streams[current + 1]  # the removed layer's output
        for per_batch in self._kwargs:
            del per_batch[current]
        del self._stats[current]
        if scale != 1.0:
            for j in range(current + 1):
                for x in self.streams[j]:
                    x.mul_(scale)
        self.invalidate(current)

    def boundary(self, current: int) -> tuple[list[Tensor], list[list[dict]]] | None:
        """The cached stream entering layer ``current`` and the per-batch layer kwargs, when up to date."""
        if not self.streams or self._dirty_from < len(decoder_layers(self.model)) or current >= len(self.streams):
            return None
        return self.streams[current], self._kwargs

    def invalidate(self, first_layer: int | None) -> None:
        """The outputs of layers ``first_layer`` and later changed beyond a uniform rescale (a fold into their
        weights): re-run them at the next scan. ``None``: the embedding changed too, so the stream entering the
        first layer is caught again."""
        if first_layer is None:
            self.streams, self._kwargs, self._stats = [], [], []
            self._dirty_from = 0
            return
        self._dirty_from = max(min(self._dirty_from, first_layer), 0)


def candidate_scores(model: nn.Module, ids: Tensor, metric: str, candidates: Sequence[int], *,
                     batch_size: int) -> dict[int, float]:
    """Scores of just ``candidates`` (current indices) for a per-candidate metric: one share of a fanned-out step.

    One full pass fills the boundary cache; each candidate's forward then starts at its own layer.
    """
    if metric not in PER_CANDIDATE_METRICS:
        raise ValueError(f"metric {metric!r} is scored in one pass; only {sorted(PER_CANDIDATE_METRICS)} fan out")
    scan = IncrementalScanner(model, ids, batch_size=batch_size).scan(metric, candidates=list(candidates))
    return {i: scan.scores[i] for i in candidates}
