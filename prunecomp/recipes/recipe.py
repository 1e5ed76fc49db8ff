"""A recipe: everything a Prune&Comp run did to a source model, as a small document a person can review.

A recipe says, relative to a source model's content hash, which ORIGINAL layers were removed in which order, what
was folded where (the gap scale ``s`` of every step, ``lsq`` gap maps, refinement gains) and each step's record
(all scores, chosen layer, ``s``, time). Replaying it on the source (:func:`prunecomp.recipes.apply.apply_recipe`) calls
the very functions the loop called, in the same order, with the same numbers, so the tensors are bit-identical to
the in-process run's. It is the pipeline's unit of state: steps exchange recipe deltas (kilobytes), not models, and
every saved model carries its recipe.

On disk a recipe is ``recipe.json`` (readable, diffable in a pull request) plus, only when a step folded a tensor
(``lsq`` maps, refinement gains), ``recipe.safetensors`` beside it. Floats are written by ``json`` with Python's
shortest round-trip ``repr``, so ``s`` comes back as exactly the same float.
"""

from __future__ import annotations

import hashlib
import json
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prunecomp.errors import PrunecompError
from prunecomp.models.tensorfiles import LazyTensors, Renamed, tensor_digest, write_safetensors

__all__ = ["FORMAT", "FORMAT_LAYERS", "FORMAT_PROGRESSIVE", "RECIPE_FILE", "TENSORS_FILE", "LayerEdit", "Recipe",
           "RecipeStep", "RefineEdit", "read_recipe", "recipe_from_report", "write_recipe_files"]

FORMAT = "prunecomp.recipe/v1"
FORMAT_PROGRESSIVE = "prunecomp.recipe/v2"
"""v2 = v1 plus ``refine`` on steps (progressive refinement); written only when a step has one, so older readers
refuse what they could not replay instead of silently skipping the gains."""
FORMAT_LAYERS = "prunecomp.recipe/v3"
"""v3 = v2 plus ``layers`` on steps (the weights block reconstruction fitted); written only when a step has them,
for the same reason."""
FORMATS = (FORMAT, FORMAT_PROGRESSIVE, FORMAT_LAYERS)
RECIPE_FILE = "recipe.json"
TENSORS_FILE = "recipe.safetensors"


@dataclass(frozen=True)
class RefineEdit:
    """Refinement's folded per-channel gains: module path -> (kind ``norm``/``linear``, norm offset, gains)."""

    gains: dict[str, tuple[str, float, Tensor]] = field(repr=False)
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def edit(self) -> dict[str, Any]:
        return {path: [kind, offset, _tensor_digest(g)] for path, (kind, offset, g) in sorted(self.gains.items())}

    def to_doc(self, prefix: str = "") -> tuple[dict[str, Any], dict[str, Tensor]]:
        """JSON of the gains (each tensor named ``<prefix><module path>``) and the tensors."""
        gains, tensors = {}, {}
        for path, (kind, offset, g) in sorted(self.gains.items()):
            gains[path] = {"kind": kind, "offset": offset, "tensor": f"{prefix}{path}"}
            tensors[f"{prefix}{path}"] = g
        return {"gains": gains, "report": self.report}, tensors

    @classmethod
    def from_doc(cls, doc: dict[str, Any], tensors: dict[str, Tensor]) -> RefineEdit:
        gains = {p: (str(g["kind"]), float(g["offset"]), tensors[g["tensor"]]) for p, g in doc["gains"].items()}
        return cls(gains=gains, report=dict(doc.get("report") or {}))


@dataclass(frozen=True)
class LayerEdit:
    """Whole-layer parameters set after the last step (the sequential refit, :mod:`prunecomp.method.refit`), by name in
    the model then; ``report`` is the refit's audit record. A recipe keeps them on its last step
    (:meth:`Recipe.with_layers`): that is where a step's ``layers`` are set on replay. The pipeline stores one as
    its own part."""

    layers: Mapping[str, Tensor] = field(repr=False)
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_doc(self, prefix: str = "") -> tuple[dict[str, Any], Mapping[str, Tensor]]:
        doc = {"layers": {name: f"{prefix}layers.{name}" for name in sorted(self.layers)}, "report": self.report}
        return doc, Renamed(self.layers, {f"{prefix}layers.{name}": name for name in self.layers})

    @classmethod
    def from_doc(cls, doc: dict[str, Any], tensors: Mapping[str, Tensor]) -> LayerEdit:
        return cls(layers=Renamed(tensors, doc["layers"]), report=dict(doc.get("report") or {}))


@dataclass(frozen=True, eq=False)
class RecipeStep:
    """One removal: ORIGINAL layer ``removed``, at index ``current`` of the model as it was then.

    ``scale`` is the magnitude scale folded upstream of the gap (``None``: no compensation); ``gap_map`` the
    ``lsq`` map folded into the last writer before the gap; ``refine`` the gains fitted right after this step
    (progressive refinement, ``refine_at="each"``), by module path of the model as it was then; ``layers`` the
    parameters block reconstruction fitted at this step (``reconstruct``), by name in the model as it was then,
    set after the folds of this step and before its refinement. ``record`` is the
    step's audit record (scores, time); it does not change the tensors and stays out of :meth:`Recipe.digest`.
    Two steps are equal when they do the same to the tensors (:meth:`edit`, tensors by digest); the record is
    not compared.
    """

    removed: int
    current: int
    scale: float | None
    gap_map: Tensor | None = field(default=None, repr=False, compare=False)
    record: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    refine: RefineEdit | None = field(default=None, repr=False, compare=False)
    layers: Mapping[str, Tensor] | None = field(default=None, repr=False, compare=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecipeStep):
            return NotImplemented
        if (self.removed, self.current, self.scale) != (other.removed, other.current, other.scale):
            return False
        return self.edit() == other.edit()

    def __hash__(self) -> int:
        return hash((self.removed, self.current, self.scale))

    def edit(self) -> dict[str, Any]:
        """What this step does to the tensors, as JSON (``gap_map`` as its sha256). A step without refinement has
        no ``refine`` key, so the digests of recipes written before progressive refinement are unchanged."""
        out: dict[str, Any] = {"removed": self.removed, "current": self.current, "scale": self.scale,
                               "gap_map": None if self.gap_map is None else _tensor_digest(self.gap_map)}
        if self.refine is not None:
            out["refine"] = self.refine.edit()
        if self.layers is not None:  # only when present: older digests unchanged
            out["layers"] = {name: tensor_digest(self.layers, name, _tensor_digest) for name in sorted(self.layers)}
        return out

    def to_doc(self, prefix: str = "") -> tuple[dict[str, Any], Mapping[str, Tensor]]:
        """JSON of this step and its tensors (named ``<prefix>gap_map``, ``<prefix>refine.<path>``,
        ``<prefix>layers.<name>``; lazy ``layers`` stay lazy)."""
        doc: dict[str, Any] = {"removed": self.removed, "current": self.current, "scale": self.scale}
        tensors: dict[str, Tensor] = {}
        parts: list[Mapping[str, Tensor]] = [tensors]
        if self.gap_map is not None:
            doc["gap_map"] = f"{prefix}gap_map"
            tensors[doc["gap_map"]] = self.gap_map
        if self.refine is not None:
            doc["refine"], named = self.refine.to_doc(f"{prefix}refine.")
            tensors |= named
        if self.layers is not None:
            doc["layers"] = {name: f"{prefix}layers.{name}" for name in sorted(self.layers)}
            parts.append(Renamed(self.layers, {f"{prefix}layers.{name}": name for name in self.layers}))
        return doc | {"record": self.record}, ChainMap(*parts)

    @classmethod
    def from_doc(cls, doc: dict[str, Any], tensors: Mapping[str, Tensor]) -> RecipeStep:
        return cls(removed=int(doc["removed"]), current=int(doc["current"]),
                   scale=None if doc["scale"] is None else float(doc["scale"]),
                   gap_map=tensors[doc["gap_map"]] if doc.get("gap_map") else None,
                   record=dict(doc.get("record") or {}),
                   refine=RefineEdit.from_doc(doc["refine"], tensors) if doc.get("refine") else None,
                   layers=Renamed(tensors, doc["layers"]) if doc.get("layers") else None)


@dataclass(frozen=True)
class Recipe:
    """What was done to ``source`` (``content_hash``, ``architecture``, ``num_layers``; ``uri`` for people).

    ``refine`` is the refinement after the last step. Progressive refinement puts the earlier fits on their steps
    (:attr:`RecipeStep.refine`); one form only: the fit after the last step is always ``refine``, so a run's
    recipe has one digest however it was assembled (in memory, or from the pipeline's parts)."""

    source: dict[str, Any]
    steps: tuple[RecipeStep, ...] = ()
    refine: RefineEdit | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps and self.steps[-1].refine is not None:
            if self.refine is not None:
                raise PrunecompError("a recipe cannot refine twice after its last step")
            object.__setattr__(self, "refine", self.steps[-1].refine)
            object.__setattr__(self, "steps", (*self.steps[:-1], replace(self.steps[-1], refine=None)))

    @property
    def progressive(self) -> bool:
        """Whether refinement ran between steps (``refine_at="each"``)."""
        return any(s.refine is not None for s in self.steps)

    @property
    def removed(self) -> list[int]:
        return [s.removed for s in self.steps]

    def digest(self) -> str:
        """sha256 of the source hash and every edit: two recipes with the same digest make the same tensors."""
        payload = {"source": self.source.get("content_hash"), "steps": [s.edit() for s in self.steps],
                   "refine": None if self.refine is None else self.refine.edit()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def edits(self) -> list[dict[str, Any]]:
        """Every edit in the order it is applied: each step, then the refinement that followed it, if any. One
        state is an earlier state of another when its edits are a prefix of the other's."""
        out: list[dict[str, Any]] = []
        for s in self.steps:
            out.append(replace(s, refine=None).edit())
            if s.refine is not None:
                out.append({"refine": s.refine.edit()})
        if self.refine is not None:
            out.append({"refine": self.refine.edit()})
        return out

    def prefix(self, n: int) -> Recipe:
        """The model right after the ``n``-th step's folds: the first ``n`` steps, with the refinements that ran
        between them (progressive runs) but not the one that followed the ``n``-th."""
        steps = self.steps[:n]
        if steps:
            steps = (*steps[:-1], replace(steps[-1], refine=None))
        return replace(self, steps=steps, refine=None)

    def plus(self, step: RecipeStep) -> Recipe:
        """This recipe and one more step; refinement so far becomes the last step's (it ran before the new one)."""
        steps = self.steps
        if self.refine is not None:
            if not steps:
                raise PrunecompError("refinement before any removal: nothing to attach it to")
            steps = (*steps[:-1], replace(steps[-1], refine=self.refine))
        return replace(self, steps=(*steps, step), refine=None)

    def with_layers(self, edit: LayerEdit) -> Recipe:
        """This recipe with ``edit``'s parameters set after its last step's folds (they join that step's
        ``layers``, later names replacing earlier ones); before the end refinement, so not on a refined recipe.
        An empty edit (nothing refitted) changes nothing."""
        if not edit.layers:
            return self
        if self.refine is not None:
            raise PrunecompError("layers are set before the end refinement: this recipe is already refined")
        if not self.steps:
            raise PrunecompError("whole-layer parameters before any removal: nothing to attach them to")
        last = self.steps[-1]
        layers = edit.layers if last.layers is None else ChainMap(edit.layers, last.layers)  # type: ignore[arg-type]
        return replace(self, steps=(*self.steps[:-1], replace(last, layers=layers)))

    def with_refine(self, edit: RefineEdit) -> Recipe:
        """This recipe refined after its last step (once: a second fit there would be a different recipe)."""
        if self.refine is not None:
            raise PrunecompError("this recipe is already refined after its last step")
        return replace(self, refine=edit)

    def to_json(self) -> tuple[dict[str, Any], Mapping[str, Tensor]]:
        """The document and its tensors (names as referenced in the document; read through, so lazy layer
        records stay on disk until written)."""
        parts: list[Mapping[str, Tensor]] = []
        steps = []
        for i, step in enumerate(self.steps):
            entry, named = step.to_doc(f"steps.{i}.")
            steps.append(entry)
            parts.append(named)
        fmt = FORMAT_LAYERS if any(s.layers is not None for s in self.steps) else \
            FORMAT_PROGRESSIVE if self.progressive else FORMAT
        doc: dict[str, Any] = {"format": fmt, "source": self.source,
                               "removed": self.removed, "digest": self.digest(), "config": self.config,
                               "steps": steps, "refine": None}
        if self.refine is not None:
            doc["refine"], named = self.refine.to_doc("refine.")
            parts.append(named)
        return doc, ChainMap(*parts) if parts else {}

    @classmethod
    def from_json(cls, doc: dict[str, Any], tensors: Mapping[str, Tensor]) -> Recipe:
        if doc.get("format") not in FORMATS:
            raise PrunecompError(f"not a prunecomp recipe (format {doc.get('format')!r}, expected one of "
                                 f"{', '.join(FORMATS)})")
        try:
            steps = tuple(RecipeStep.from_doc(entry, tensors) for entry in doc["steps"])
            refine = RefineEdit.from_doc(doc["refine"], tensors) if doc.get("refine") else None
            recipe = cls(source=dict(doc["source"]), steps=steps, refine=refine, config=dict(doc.get("config") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise PrunecompError(f"malformed recipe: {type(exc).__name__}: {exc}") from exc
        if doc.get("digest") and doc["digest"] != recipe.digest():
            raise PrunecompError("recipe digest does not match its content (edited by hand, or its tensors file "
                                 "belongs to another recipe)")
        return recipe


def _tensor_digest(t: Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_recipe_files(recipe: Recipe, folder: Path) -> None:
    """Write ``recipe.json`` (and ``recipe.safetensors`` when it has tensors) into ``folder``."""
    doc, tensors = recipe.to_json()
    (folder / RECIPE_FILE).write_text(json.dumps(doc, indent=1, default=str))
    if tensors:  # one tensor in memory at a time (a streamed run's fitted layers are read from its spill files)
        write_safetensors(tensors, folder / TENSORS_FILE)


def read_recipe(path: str | Path) -> Recipe:
    """A recipe from ``recipe.json`` or the folder holding it (a pruned model, a run's artifacts); local or fsspec."""
    from safetensors.torch import load as load_safetensors

    from prunecomp.models.storage import is_remote

    text = str(path)
    doc_uri = text if text.endswith(".json") else f"{text.rstrip('/')}/{RECIPE_FILE}"
    tensors_uri = f"{doc_uri.rsplit('/', 1)[0]}/{TENSORS_FILE}" if "/" in doc_uri else TENSORS_FILE

    def read(uri: str) -> bytes | None:
        if not is_remote(uri):
            p = Path(uri.removeprefix("file://")).expanduser()
            return p.read_bytes() if p.is_file() else None
        import fsspec

        fs, inner = fsspec.core.url_to_fs(uri)
        try:
            return bytes(fs.cat_file(inner))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise PrunecompError(f"cannot read recipe {uri!r}: {type(exc).__name__}: {exc}") from exc

    raw = read(doc_uri)
    if raw is None:
        raise PrunecompError(f"recipe {text!r} not found (expected {RECIPE_FILE} or a folder holding it)")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrunecompError(f"recipe {doc_uri!r} is not valid JSON: {exc}") from exc
    tensors: Mapping[str, Tensor] = {}
    local = None if is_remote(tensors_uri) else Path(tensors_uri.removeprefix("file://")).expanduser()
    try:
        if local is not None:  # read lazily: a reconstructed run's recipe holds whole layers
            tensors = LazyTensors(local) if local.is_file() else {}
        elif (blob := read(tensors_uri)) is not None:
            tensors = load_safetensors(blob)
    except Exception as exc:
        raise PrunecompError(f"recipe tensors {tensors_uri!r} are unreadable: {exc}") from exc
    if not isinstance(doc, dict):
        raise PrunecompError(f"recipe {doc_uri!r} is not a JSON object")
    return Recipe.from_json(doc, tensors)


def recipe_from_report(report: Any, source: dict[str, Any] | None = None) -> Recipe:
    """The recipe of a run from its report: a :class:`~prunecomp.recipes.report.PruneReport` (which keeps its folded
    tensors), or a JSON report (``prune --json``, a model's ``prunecomp_report.json``, a pipeline ``report.json``).

    A JSON report holds every removal and scale (floats round-trip exactly through JSON) but not the tensors of
    ``lsq`` maps or refinement gains: for those runs, use the recipe saved beside the model.
    """
    if isinstance(report, dict):
        return _from_report_dict(report, source)
    compensated = report.config.get("compensation") != "none"
    steps = tuple(RecipeStep(removed=r.chosen, current=r.chosen_current,
                             scale=r.applied_scale if compensated else None, gap_map=r.gap_map,
                             record=r.to_dict(),
                             refine=None if r.refine_edit is None else RefineEdit(r.refine_edit, dict(r.refine or {})),
                             layers=r.layer_weights)
                  for r in report.steps)
    refine = None
    if report.refine_edit is not None:
        refine = RefineEdit(gains=report.refine_edit, report=dict(report.refine or {}))
    return Recipe(source=_source_doc(source or {}, report.source_num_layers), steps=steps, refine=refine,
                  config=dict(report.config))


def _from_report_dict(report: dict[str, Any], source: dict[str, Any] | None) -> Recipe:
    config = dict(report.get("config") or {})
    config = dict(config.get("prune", config))  # a pipeline report nests the prune config
    if config.get("compensation") == "lsq" or config.get("refine") not in (None, "none") \
            or config.get("reconstruct") not in (None, "none"):
        raise PrunecompError("this report's run folded lsq maps, refinement gains or reconstructed layers, which a "
                             "JSON report does not hold: use the recipe.json (+ recipe.safetensors) saved beside "
                             "its model")
    compensated = config.get("compensation", "magnitude") != "none"
    steps = []
    try:
        for entry in report["steps"]:
            if entry.get("kept") is False:
                continue
            rec = entry.get("record", entry)
            steps.append(RecipeStep(removed=int(rec["chosen"]), current=int(rec["chosen_current"]),
                                    scale=float(rec["applied_scale"]) if compensated else None, record=dict(rec)))
        src = dict(source or report.get("source") or {})
        n = int(report.get("source_num_layers") or src.get("num_layers") or (report.get("base") or {})["num_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PrunecompError(f"not a prunecomp report with pruning steps ({type(exc).__name__}: {exc})") from exc
    return Recipe(source=_source_doc(src, n), steps=tuple(steps), config=config)


def _source_doc(source: dict[str, Any], num_layers: int) -> dict[str, Any]:
    keep = ("content_hash", "architecture", "uri", "revision", "kind")
    return {k: source[k] for k in keep if source.get(k) is not None} | {"num_layers": int(num_layers)}
