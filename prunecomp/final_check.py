"""The last check before saving: did compensation (and refinement) make the pruned model better than simply
removing the same layers?

Why: compensation is a bet placed step by step on calibration windows; the run's end result is what a user
ships. So the final model's calibration loss on HELD-OUT windows (same source, disjoint from the calibration
windows, see :func:`prunecomp.calibration.held_out_windows`) is compared with the loss of the same layers removed
and nothing folded. A worse result is reported loudly (CLI summary, run report, MLflow tag) and a promotion gate
can refuse it.

Why it costs one extra forward and no copy of the model: everything a run folds is multiplicative on some
module's output (scales on the embedding and residual writers, ``lsq`` maps on one writer's output, refinement
gains on norms and linears). :func:`uncompensated_view` undoes them with temporary forward hooks computed from the
run's recipe: inside it the model computes the plain layer-removed model (to float rounding; tested against a
model pruned with ``compensation="none"``). A tied head's compensation (the head scaled with the embedding table,
the final norm divided) cancels by itself and is left alone: only the embedding's output is hooked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunecomp.adapters import decoder_layers, get_adapter, resolve
from prunecomp.calibration import held_out_windows
from prunecomp.config import CalibrationConfig
from prunecomp.evaluation.perplexity import mean_nll
from prunecomp.recipe import Recipe

__all__ = ["FinalCheck", "final_check", "line", "output_edits", "run_final_check", "uncompensated_view"]

TOLERANCE = 1e-4
"""Relative NLL margin below which the two are called equal (float rounding of the hooked forward)."""


@dataclass(frozen=True)
class FinalCheck:
    """Held-out calibration NLL of the final model and of the same layers removed with nothing folded."""

    loss: float
    uncompensated_loss: float
    windows: int
    digest: str
    folded: str  # what the run folded: "scales", "scales+maps", "scales+refine", ...

    @property
    def worse(self) -> bool:
        return self.loss > self.uncompensated_loss * (1.0 + TOLERANCE)

    @property
    def verdict(self) -> str:
        if self.worse:
            return "worse"
        return "better" if self.loss < self.uncompensated_loss * (1.0 - TOLERANCE) else "same"

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "uncompensated_loss": self.uncompensated_loss, "verdict": self.verdict,
                "ppl": math.exp(self.loss), "uncompensated_ppl": math.exp(self.uncompensated_loss),
                "windows": self.windows, "digest": self.digest, "folded": self.folded}


def line(doc: dict[str, Any]) -> str:
    """A final check (:meth:`FinalCheck.to_dict`) as one sentence; starts with ``WARNING`` when worse."""
    ppl, base = doc["ppl"], doc["uncompensated_ppl"]
    what = doc["folded"].replace("+", " and ")
    if doc["verdict"] == "worse":
        return (f"WARNING: the {what} folded by this run made the model WORSE than removing the same layers "
                f"without them: held-out calibration perplexity {ppl:.3f} vs {base:.3f} "
                f"({doc['windows']} windows). Consider --compensation none or guarded.")
    if doc["folded"] == "nothing":  # every scale declined, nothing refined: the final model IS the baseline
        return (f"final check: nothing was folded (held-out calibration perplexity {ppl:.3f}, the same as removing "
                f"the layers plainly; {doc['windows']} windows)")
    return (f"final check: held-out calibration perplexity {ppl:.3f} with the {what} folded vs {base:.3f} without "
            f"({doc['verdict']}, {doc['windows']} windows)")


def output_edits(model: nn.Module, recipe: Recipe) -> dict[str, tuple[float, list[Tensor], Tensor | None]]:
    """Per module path of the (already pruned) model: what the run multiplied its output by, as
    ``(scalar product, [lsq maps in fold order], per-channel gains or None)``. Pure bookkeeping over the recipe.

    Refinement gains of a progressive run name modules by their index at the time of the fit: they are followed
    to the layer's final index through the removals (gains of a layer removed later are gone with it), and gains
    fitted on the same module at several steps multiply (per-channel output gains and scalar scales commute)."""
    adapter = get_adapter(model)
    layers_path = adapter.layers
    kept = list(range(len(decoder_layers(model, adapter)) + len(recipe.steps)))  # the source's depth
    writers: dict[int, list[Any]] = {o: [1.0, []] for o in kept}  # original layer -> [scale product, maps]
    embed: list[Any] = [1.0, []]
    fitted: dict[tuple[int | None, str], Tensor] = {}  # (original layer or None, path in it / in the model) -> gain

    def add_gains(gains: dict[str, tuple[str, float, Tensor]]) -> None:
        for path, (_kind, _offset, gain) in gains.items():
            key: tuple[int | None, str] = (None, path)
            if path.startswith(f"{layers_path}."):
                index, _, rest = path[len(layers_path) + 1:].partition(".")
                key = (kept[int(index)], rest)
            g = gain.detach().to(torch.float32)
            fitted[key] = fitted[key] * g if key in fitted else g

    for step in recipe.steps:
        del kept[step.current]
        if step.scale is not None and step.scale != 1.0:
            embed[0] *= step.scale
            for o in kept[: step.current]:
                writers[o][0] *= step.scale
        if step.gap_map is not None:
            target = embed if step.current == 0 else writers[kept[step.current - 1]]
            target[1].append(step.gap_map)
        if step.refine is not None:
            add_gains(step.refine.gains)
    if recipe.refine is not None:
        add_gains(recipe.refine.gains)
    out: dict[str, tuple[float, list[Tensor], Tensor | None]] = {}
    if embed[0] != 1.0 or embed[1]:
        out[adapter.embed] = (embed[0], embed[1], None)
    for j, o in enumerate(kept):
        scale, maps = writers[o]
        if scale == 1.0 and not maps:
            continue
        for path in adapter.residual_writers:
            out[f"{layers_path}.{j}.{path}"] = (scale, maps if path == adapter.lsq_writer else [], None)
    final_index = {o: j for j, o in enumerate(kept)}
    for (o, rest), gain in fitted.items():
        if o is not None and o not in final_index:
            continue  # fitted on a layer that a later step removed
        path = rest if o is None else f"{layers_path}.{final_index[o]}.{rest}"
        scale, maps, _ = out.get(path, (1.0, [], None))
        out[path] = (scale, maps, gain)
    return out


@contextmanager
def uncompensated_view(model: nn.Module, recipe: Recipe) -> Iterator[None]:
    """Inside the block ``model`` computes the same layers removed with nothing folded (hooks always removed)."""
    adapter = get_adapter(model)
    known = recipe.source.get("num_layers")
    if known is not None and len(decoder_layers(model, adapter)) != int(known) - len(recipe.steps):
        raise ValueError("the recipe does not describe this model's removals")
    handles = []

    def hook(scale: float, inverses: list[Tensor], gain: Tensor | None) -> Any:
        def fn(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor:
            x = output.float()
            if gain is not None:
                x = x / gain.to(x.device, torch.float32)
            x = x / scale
            for inv in inverses:
                x = (x.double() @ inv.to(x.device)).float()
            return x.to(output.dtype)

        return fn

    try:
        for path, (scale, maps, gain) in output_edits(model, recipe).items():
            inverses = [torch.linalg.inv(t.double()) for t in reversed(maps)]
            handles.append(resolve(model, path).register_forward_hook(hook(scale, inverses, gain)))
        yield
    finally:
        for h in handles:
            h.remove()


def final_check(model: nn.Module, recipe: Recipe, ids: Tensor, digest: str, *, batch_size: int = 4,
                nll: Callable[[Tensor], float] | None = None) -> FinalCheck:
    """Held-out NLL of ``model`` (pruned as ``recipe`` says) with and without what the run folded. ``nll``: how to
    measure the model's mean NLL on windows (default: a plain forward; a layer-streamed model passes its own)."""
    measure = nll or (lambda x: mean_nll(model, x, batch_size=batch_size))
    loss = measure(ids)
    with uncompensated_view(model, recipe):
        base = measure(ids)
    parts = []
    if any(s.scale not in (None, 1.0) for s in recipe.steps):
        parts.append("scales")
    if any(s.gap_map is not None for s in recipe.steps):
        parts.append("maps")
    if recipe.refine is not None or recipe.progressive:
        parts.append("refine")
    return FinalCheck(loss=loss, uncompensated_loss=base, windows=int(ids.shape[0]), digest=digest,
                      folded="+".join(parts) or "nothing")


def run_final_check(model: nn.Module, tokenizer: Any, recipe: Recipe, calibration: CalibrationConfig,
                    data_dir: str | None, *, nll: Callable[[Tensor], float] | None = None) -> FinalCheck | None:
    """The final check on ``calibration.held_out`` held-out windows (``None`` when that is 0)."""
    if calibration.held_out == 0:
        return None
    windows = held_out_windows(tokenizer, calibration.source, n_windows=calibration.held_out,
                               seq_len=calibration.seq_len, calibration_samples=calibration.n_samples,
                               seed=calibration.seed, data_dir=data_dir)
    return final_check(model, recipe, windows.ids, windows.digest, batch_size=calibration.batch_size, nll=nll)
