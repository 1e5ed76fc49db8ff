"""The last check before saving: did compensation (and refinement) make the pruned model better than simply
removing the same layers?

Why: compensation is a bet placed step by step on calibration windows; the run's end result is what a user
ships. So the final model's calibration loss on HELD-OUT windows (same source, disjoint from the calibration
windows, see :func:`prunecomp.corpora.calibration.held_out_windows`) is compared with the loss of the same layers
removed and nothing folded. A worse result is reported loudly (CLI summary, run report, MLflow tag) and a promotion gate
can refuse it.

Why it costs one extra forward and no copy of the model: everything a run folds is multiplicative on some
module's output (scales on the embedding and residual writers, ``lsq`` maps on one writer's output, refinement
gains on norms and linears). :func:`uncompensated_view` undoes them with temporary forward hooks computed from the
run's recipe: inside it the model computes the plain layer-removed model (to float rounding; tested against a
model pruned with ``compensation="none"``). A tied head's compensation (the head scaled with the embedding table,
the final norm divided) cancels by itself and is left alone: only the embedding's output is hooked. Block
reconstruction (``reconstruct``) rewrites whole layers, which no output hook undoes: for those layers the view
swaps the source's weights in (``originals``, read from the source by the caller; :func:`reconstructed_layers`
names them) and hooks nothing inside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunecomp.config import CalibrationConfig, PruneConfig
from prunecomp.corpora.calibration import TokenWindows, held_out_windows
from prunecomp.models.adapters import decoder_layers, get_adapter, resolve
from prunecomp.recipes.recipe import Recipe

__all__ = ["FinalCheck", "Op", "decision_windows", "final_check", "held_out_config", "line", "output_edits",
           "reconstructed_layers", "run_final_check", "uncompensated_view"]

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
    names = {"scales": "scales", "maps": "lsq maps", "reconstruct": "reconstructed layers",
             "refine": "refinement gains"}
    parts = [names.get(p, p) for p in doc["folded"].split("+")]
    what = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts)
    if doc["verdict"] == "worse":
        return (f"WARNING: the {what} folded by this run made the model WORSE than removing the same layers "
                f"without them: held-out calibration perplexity {ppl:.3f} vs {base:.3f} "
                f"({doc['windows']} windows). Consider --compensation none or guarded.")
    if doc["folded"] == "nothing":  # every scale declined, nothing refined: the final model IS the baseline
        return (f"final check: nothing was folded (held-out calibration perplexity {ppl:.3f}, the same as removing "
                f"the layers plainly; {doc['windows']} windows)")
    return (f"final check: held-out calibration perplexity {ppl:.3f} with the {what} folded vs {base:.3f} without "
            f"({doc['verdict']}, {doc['windows']} windows)")


Op = tuple[str, Tensor]
"""One fold on a module's output after its scalar scale: ``("map", T)`` (``y T``, an ``lsq`` gap map) or
``("gain", g)`` (``y * g``, refinement); kept in fold order, because a map and a later gain do not commute."""


def output_edits(model: nn.Module, recipe: Recipe) -> dict[str, tuple[float, list[Op]]]:
    """Per module path of the (already pruned) model: what the run multiplied its output by, as
    ``(scalar product, [maps and gains in fold order])``. Pure bookkeeping over the recipe.

    Refinement gains of a progressive run name modules by their index at the time of the fit: they are followed
    to the layer's final index through the removals (gains of a layer removed later are gone with it). Scalar
    scales commute with everything and are multiplied together; maps and gains keep their order (an ``lsq`` map
    folded at step 2 acts on the output that step 1's gains already scaled)."""
    adapter = get_adapter(model)
    layers_path = adapter.layers
    kept = list(range(len(decoder_layers(model, adapter)) + len(recipe.steps)))  # the source's depth
    scales: dict[int | None, float] = {o: 1.0 for o in kept} | {None: 1.0}  # original layer (None: embedding)
    ops: dict[tuple[int | None, str], list[Op]] = {}  # (original layer or None, path in it / in the model)

    def add_gains(gains: dict[str, tuple[str, float, Tensor]]) -> None:
        for path, (_kind, _offset, gain) in gains.items():
            key: tuple[int | None, str] = (None, path)
            if path.startswith(f"{layers_path}."):
                index, _, rest = path[len(layers_path) + 1:].partition(".")
                key = (kept[int(index)], rest)
            ops.setdefault(key, []).append(("gain", gain.detach().to(torch.float32)))

    for step in recipe.steps:
        del kept[step.current]
        if step.scale is not None and step.scale != 1.0:
            scales[None] *= step.scale
            for o in kept[: step.current]:
                scales[o] *= step.scale
        if step.gap_map is not None:
            key = (None, adapter.embed) if step.current == 0 else (kept[step.current - 1], str(adapter.lsq_writer))
            ops.setdefault(key, []).append(("map", step.gap_map))
        if step.refine is not None:
            add_gains(step.refine.gains)
    if recipe.refine is not None:
        add_gains(recipe.refine.gains)
    final_index = {o: j for j, o in enumerate(kept)}

    def path_of(o: int | None, rest: str) -> str:
        return rest if o is None else f"{layers_path}.{final_index[o]}.{rest}"

    out: dict[str, tuple[float, list[Op]]] = {}
    if scales[None] != 1.0:
        out[adapter.embed] = (scales[None], [])
    for o in kept:
        if scales[o] != 1.0:
            for path in adapter.residual_writers:
                out[path_of(o, path)] = (scales[o], [])
    for (o, rest), these in ops.items():
        if o is not None and o not in final_index:
            continue  # fitted on a layer that a later step removed
        path = path_of(o, rest)
        out[path] = (out.get(path, (1.0, []))[0], these)
    return out


def reconstructed_layers(recipe: Recipe, num_layers: int) -> dict[int, int]:
    """Final index -> ORIGINAL index of every layer of the pruned model (``num_layers`` left) that block
    reconstruction rewrote (the layers whose source weights :func:`uncompensated_view` needs)."""
    if not any(s.layers for s in recipe.steps):
        return {}
    kept = list(range(num_layers + len(recipe.steps)))
    fitted: set[int] = set()
    for step in recipe.steps:
        del kept[step.current]
        for name in step.layers or {}:
            index = _layer_index(name)
            if index is not None:
                fitted.add(kept[index])
    return {j: o for j, o in enumerate(kept) if o in fitted}


def _layer_index(name: str) -> int | None:
    """The decoder-layer index in a parameter name like ``model.layers.13.mlp.up_proj.weight``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


Sourced = Callable[[dict[int, int]], AbstractContextManager[Any]]
"""How a layer-streamed model puts the source's weights in for the layers block reconstruction rewrote: given
:func:`reconstructed_layers` (final index -> original), a context inside which those layers load the source's
weights with nothing folded (:meth:`prunecomp.engine.streamed.StreamedModel.sourced`)."""


@contextmanager
def uncompensated_view(model: nn.Module, recipe: Recipe,
                       originals: Mapping[int, Mapping[str, Tensor]] | None = None, *,
                       sourced: Sourced | None = None) -> Iterator[None]:
    """Inside the block ``model`` computes the same layers removed with nothing folded (hooks always removed).

    ``originals``: for every layer block reconstruction rewrote (final index, see :func:`reconstructed_layers`),
    the source's parameters by name inside the layer; swapped in for the block and restored after. ``sourced``:
    instead of ``originals``, for a model whose layers are loaded on use (see :data:`Sourced`)."""
    adapter = get_adapter(model)
    known = recipe.source.get("num_layers")
    layers = decoder_layers(model, adapter)
    if known is not None and len(layers) != int(known) - len(recipe.steps):
        raise ValueError("the recipe does not describe this model's removals")
    rewritten = reconstructed_layers(recipe, len(layers))
    missing = sorted(set(rewritten) - set(originals or {})) if sourced is None else []
    if missing:
        raise ValueError(f"layers {[rewritten[j] for j in missing]} were reconstructed: the view needs their source "
                         "weights (originals=)")
    handles = []
    saved: list[tuple[Tensor, Tensor]] = []
    inside = tuple(f"{adapter.layers}.{j}." for j in rewritten)

    def hook(scale: float, undo: list[Op]) -> Any:
        def fn(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor:
            x = output.float() / scale
            for kind, t in undo:  # the last fold first; a map's inverse was taken in float64
                x = x / t.to(x.device, torch.float32) if kind == "gain" else (x.double() @ t.to(x.device)).float()
            return x.to(output.dtype)

        return fn

    with ExitStack() as stack:
        if sourced is not None and rewritten:  # the streamed model loads those layers from the source meanwhile
            stack.enter_context(sourced(rewritten))
        try:
            with torch.no_grad():
                for j in rewritten if sourced is None else ():
                    params = dict(layers[j].named_parameters())
                    for name, src in (originals or {})[j].items():
                        if name not in params or params[name].shape != src.shape:
                            raise ValueError(f"source weights {name!r} do not fit layer {rewritten[j]}")
                        saved.append((params[name], params[name].detach().clone()))
                        params[name].copy_(src.to(device=params[name].device, dtype=params[name].dtype))
            for path, (scale, these) in output_edits(model, recipe).items():
                if path.startswith(inside):  # the source's weights are in: nothing there to undo
                    continue
                undo = [(kind, torch.linalg.inv(t.double()) if kind == "map" else t) for kind, t in reversed(these)]
                handles.append(resolve(model, path).register_forward_hook(hook(scale, undo)))
            yield
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)


def final_check(target: Any, recipe: Recipe, ids: Tensor, digest: str, *, batch_size: int = 4,
                originals: Mapping[int, Mapping[str, Tensor]] | None = None) -> FinalCheck:
    """Held-out NLL of ``target`` (an in-memory model or a layer-streamed one, pruned as ``recipe`` says) with and
    without what the run folded, both measured by its backend (:mod:`prunecomp.engine.backends`). ``originals``:
    in memory, the source weights of reconstructed layers (see :func:`uncompensated_view`); a layer-streamed
    model loads them itself."""
    from prunecomp.engine.loop import backend_for

    backend = backend_for(target, batch_size=batch_size)
    loss = backend.mean_nll(ids)
    with uncompensated_view(backend.model, recipe, originals, sourced=backend.sourced):
        base = backend.mean_nll(ids)
    parts = []
    if any(s.scale not in (None, 1.0) for s in recipe.steps):
        parts.append("scales")
    if any(s.gap_map is not None for s in recipe.steps):
        parts.append("maps")
    if any(s.layers is not None for s in recipe.steps):
        parts.append("reconstruct")
    if recipe.refine is not None or recipe.progressive:
        parts.append("refine")
    return FinalCheck(loss=loss, uncompensated_loss=base, windows=int(ids.shape[0]), digest=digest,
                      folded="+".join(parts) or "nothing")


def held_out_config(calibration: CalibrationConfig, prune: PruneConfig) -> CalibrationConfig:
    """``calibration`` as the final check (and the held-out decisions) draw held-out windows from it: avoiding every
    window the run fitted on (``refine_samples`` of the same draw, when larger than the scoring windows), so that
    no fit sees a window it is judged on."""
    n = prune.fit_samples(calibration.n_samples)
    return calibration if n == calibration.n_samples else calibration.model_copy(update={"n_samples": n})


def decision_windows(tokenizer: Any, held_out: CalibrationConfig, data_dir: str | None) -> TokenWindows:
    """The windows the gains and block reconstruction are kept or declined on: ``held_out.held_out`` more held-out
    windows after the final check's (the same draw continued), so the final check stays independent of those
    decisions. ``held_out``: the calibration config as :func:`held_out_config` returns it."""
    return held_out_windows(tokenizer, held_out.source, n_windows=held_out.held_out, seq_len=held_out.seq_len,
                            calibration_samples=held_out.n_samples, seed=held_out.seed, data_dir=data_dir,
                            after=held_out.held_out)


def run_final_check(target: Any, tokenizer: Any, recipe: Recipe, calibration: CalibrationConfig,
                    data_dir: str | None, *,
                    originals: Callable[[dict[int, int]], Mapping[int, Mapping[str, Tensor]]] | None = None
                    ) -> FinalCheck | None:
    """The final check on ``calibration.held_out`` held-out windows (``None`` when that is 0), for an in-memory or
    a layer-streamed ``target``. ``originals``: in memory, given :func:`reconstructed_layers` of the recipe, the
    source weights of those layers by final index (called only when some layer was reconstructed)."""
    if calibration.held_out == 0:
        return None
    windows = held_out_windows(tokenizer, calibration.source, n_windows=calibration.held_out,
                               seq_len=calibration.seq_len, calibration_samples=calibration.n_samples,
                               seed=calibration.seed, data_dir=data_dir)
    model = target if isinstance(target, nn.Module) else target.model
    rewritten = reconstructed_layers(recipe, len(decoder_layers(model)))
    streamed = not isinstance(target, nn.Module)
    if rewritten and originals is None and not streamed:
        raise ValueError("this run reconstructed layers: the final check needs a reader of the source's weights")
    return final_check(target, recipe, windows.ids, windows.digest, batch_size=calibration.batch_size,
                       originals=originals(rewritten) if rewritten and originals is not None and not streamed
                       else None)
