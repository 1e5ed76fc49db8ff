"""The pipeline's model state: a source model plus a recipe, and the one process-local working copy of it.

Step tasks exchange recipe parts (kilobytes: a step's edit and record, plus an ``lsq`` map or refinement gains),
never models. A part lives at ``<store>/steps/<key>`` (or ``<store>/refined/<key>``) as ``part.json`` with an
optional ``tensors.safetensors``; a model state is ``(base, [part URIs])`` and its identity is the recipe digest
(:meth:`prunecomp.recipes.recipe.Recipe.digest`: source content hash + every edit).

Getting the model of a state (:func:`checkout`): when this process's working copy is at a prefix of the wanted
recipe, the missing steps are applied to it (none, when the previous step ran here: an uninterrupted run loads
the source once and keeps the incremental scanner's cached layer boundaries from step to step); otherwise the
source is loaded once and the recipe replayed, which is bit-identical to having run the steps here. A task that
fails while holding the copy drops it (it may be half-edited). One copy per process, behind a lock: tasks that
need their own model at the same time (fanned-out candidates) use :func:`load_state`.

A load is on the job's device type and dtype (they are in its key), and checks the source first
(:func:`verify_source`): against the job's record of it when there is one (file stamps, no weight read again),
else by hashing it. A source that changed under its URI since the run hashed it is an error, never a model
served under the old hash.
"""

from __future__ import annotations

import gc
import json
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecomp.engine.loop import replay
from prunecomp.errors import PrunecompError
from prunecomp.models.redact import redact
from prunecomp.models.storage import is_remote, write_dir
from prunecomp.models.tensorfiles import LazyTensors, write_safetensors
from prunecomp.recipes.recipe import LayerEdit, Recipe, RecipeStep, RefineEdit
from tasks.files import exists, read_json
from tasks.keys import (
    SourceRecord,
    check_source,
    default_device,
    default_dtype,
    model_state_hash,
    record_source,
    source_stamps,
)

__all__ = ["PART_FILE", "Working", "checkout", "load_state", "read_part", "recipe_of", "stats", "verify_source",
           "write_part"]

PART_FILE = "part.json"
_TENSORS = "tensors.safetensors"


_TYPES: dict[str, type[RecipeStep] | type[RefineEdit] | type[LayerEdit]] = {
    "step": RecipeStep, "refine": RefineEdit, "layers": LayerEdit}


def write_part(uri: str, part: RecipeStep | RefineEdit | LayerEdit, meta: dict[str, Any]) -> None:
    """Write one recipe part (a step's edit + record, refinement gains, or a refit's layers) with ``meta``,
    atomically."""
    doc, tensors = part.to_doc()
    doc["type"] = next(name for name, cls in _TYPES.items() if isinstance(part, cls))

    def fill(tmp: Path) -> None:
        (tmp / PART_FILE).write_text(json.dumps(meta | {"part": doc}, indent=1, default=str))
        if tensors:
            write_safetensors(tensors, tmp / _TENSORS)  # one tensor in memory at a time

    write_dir(uri, fill, owned=True)


def read_meta(uri: str) -> dict[str, Any]:
    """The metadata a part was written with (without the part itself)."""
    doc = dict(read_json(f"{uri.rstrip('/')}/{PART_FILE}"))
    doc.pop("part", None)
    return doc


def read_part(uri: str) -> RecipeStep | RefineEdit | LayerEdit:
    """A recipe part; its tensors are read when used (:class:`~prunecomp.models.tensorfiles.LazyTensors`): a part of
    block reconstruction holds two whole layers, and a task reads every part of its state."""
    doc = read_json(f"{uri.rstrip('/')}/{PART_FILE}")["part"]
    tensor_uri = f"{uri.rstrip('/')}/{_TENSORS}"
    tensors = LazyTensors(_local_copy(tensor_uri)) if exists(tensor_uri) else {}
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind not in _TYPES:
        raise PrunecompError(f"recipe part {redact(uri)!r} has type {kind!r}; expected one of {sorted(_TYPES)} (a part "
                             "written by another prunecomp version, or damaged: delete the part to recompute it)")
    return _TYPES[kind].from_doc(doc, tensors)


_FETCHED: dict[str, Path] = {}
_FETCH_DIR: tempfile.TemporaryDirectory[str] | None = None
_FETCH_LOCK = threading.Lock()


def _local_copy(uri: str) -> Path:
    """``uri`` as a local file: itself when local, else a copy fetched once per process (parts are written once,
    atomically, and checked against the state's digest when read)."""
    global _FETCH_DIR
    if not is_remote(uri):
        return Path(uri.removeprefix("file://")).expanduser()
    with _FETCH_LOCK:
        if uri not in _FETCHED or not _FETCHED[uri].is_file():
            if _FETCH_DIR is None:
                _FETCH_DIR = tempfile.TemporaryDirectory(prefix="prunecomp-parts-")
            import fsspec

            local = Path(_FETCH_DIR.name) / f"{len(_FETCHED)}.safetensors"
            fs, inner = fsspec.core.url_to_fs(uri)
            fs.get_file(inner, str(local))  # streamed to disk: a reconstruction part holds two whole layers
            _FETCHED[uri] = local
        return _FETCHED[uri]


def recipe_of(base_hash: str, parts: tuple[str, ...] | list[str], expected_digest: str | None = None) -> Recipe:
    """The recipe of a state: ``base_hash`` plus the parts, in order; checked against ``expected_digest``."""
    recipe = Recipe(source={"content_hash": base_hash})
    for uri in parts:
        part = read_part(uri)
        if isinstance(part, RecipeStep):
            recipe = recipe.plus(part)
        elif isinstance(part, LayerEdit):
            recipe = recipe.with_layers(part)
        else:
            recipe = recipe.with_refine(part)
    if expected_digest is not None and recipe.digest() != expected_digest:
        raise PrunecompError(redact(f"the recipe parts in the store ({', '.join(parts) or 'none'}) no longer make "
                                    f"the recorded state {expected_digest[:12]}; delete them to have them recomputed"))
    return recipe


@dataclass
class Working:
    """A model at some recipe: in memory (``model``) or layer-streamed (``streamed``), with what rides along."""

    base_hash: str
    stream: bool
    model: Any
    tokenizer: Any
    recipe: Recipe
    streamed: Any = None
    scanner: Any = None  # prunecomp.engine.incremental.IncrementalScanner of ``model`` at ``recipe``
    scanner_for: str | None = None  # calibration digest + batch size it was built on
    device: str = "cpu"  # device type and dtype it was loaded with
    dtype: str = "float32"


_LOCK = threading.RLock()
_COPY: Working | None = None
_STATS = {"loads": 0, "replayed_steps": 0, "reused": 0}


def stats() -> dict[str, int]:
    """How often this process loaded a source, replayed steps, or reused its working copy (for tests, benches)."""
    return dict(_STATS)


def _is_prefix(have: Recipe, want: Recipe) -> bool:
    """Whether ``have`` is an earlier state of ``want``: its edits (steps and refinements, in order) begin them."""
    if have.source.get("content_hash") != want.source.get("content_hash"):
        return False
    mine, theirs = have.edits(), want.edits()
    return len(mine) <= len(theirs) and theirs[: len(mine)] == mine


def verify_source(uri: str, expected_hash: str, record: SourceRecord | None) -> bool:
    """Whether the model at ``uri`` is still the one hashed into ``expected_hash``.

    With the job's ``record`` (made when the flow hashed the source), its file stamps are compared, no weight is
    read, and a difference raises. Without one, the files are hashed here (a local source is then recorded for
    this process); ``False`` when they do not hash to it, which is also what a materialised base keyed by its
    tensor hash gives: the caller then compares the loaded tensors (:func:`tasks.keys.model_state_hash`)."""
    if record is not None:
        check_source(record, expected_hash)
        return True
    from prunecomp.models.sources import content_hash, resolve_source

    before = source_stamps(uri)
    if content_hash(resolve_source(uri)) != expected_hash:
        return False
    # a remote source is hashed from this process's download, which may predate the stamps: not recorded
    if not is_remote(uri) and source_stamps(uri) == before:
        record_source(uri, expected_hash, before)
    return True


def _compute(device: str | None, dtype: str | None) -> tuple[str, str]:
    device = device or default_device()
    return device, dtype or default_dtype(device)


def _load(base_uri: str, base_hash: str, stream: bool, device: str, dtype: str,
          record: SourceRecord | None) -> Working:
    import torch

    from prunecomp.models.sources import load_model, resolve_source

    _STATS["loads"] += 1
    empty = Recipe(source={"content_hash": base_hash})
    verified = verify_source(base_uri, base_hash, record)
    changed = PrunecompError(redact(f"model {base_uri!r} is not the {base_hash[:12]} this job was keyed by: it "
                                    "changed after the run hashed it; run again to key its new content"))
    if stream:
        from transformers import AutoTokenizer

        from prunecomp.engine.streamed import StreamedModel

        if not verified:
            raise changed
        folder = resolve_source(base_uri).local_dir
        sm = StreamedModel(folder, dtype=getattr(torch, dtype), device=device)
        return Working(base_hash, True, sm.model, AutoTokenizer.from_pretrained(folder), empty, streamed=sm,
                       device=device, dtype=dtype)
    lm = load_model(base_uri, known_hash=base_hash, device=device, dtype=getattr(torch, dtype))
    if not verified and model_state_hash(lm.model) != base_hash:
        raise changed
    return Working(base_hash, False, lm.model, lm.tokenizer, empty, device=device, dtype=dtype)


def _advance(wc: Working, recipe: Recipe) -> None:
    """Apply the steps (and refinements) of ``recipe`` that ``wc`` lacks (``wc.recipe`` is a prefix of it)."""
    if len(wc.recipe.edits()) == len(recipe.edits()):
        return
    start, refined = len(wc.recipe.steps), wc.recipe.refine is not None
    wc.scanner = wc.scanner_for = None  # replayed edits do not tell the scanner
    _STATS["replayed_steps"] += len(recipe.steps) - start
    replay(wc.streamed if wc.streamed is not None else wc.model, recipe, start=start, refined=refined)
    wc.recipe = recipe


def load_state(base_uri: str, recipe: Recipe, *, stream: bool = False, device: str | None = None,
               dtype: str | None = None, record: SourceRecord | None = None) -> Working:
    """A private copy of the model at ``recipe`` (source loaded, recipe replayed) on ``device`` in ``dtype``
    (default: this machine's); ``record``: the job's record of the source (:func:`verify_source`)."""
    wc = _load(base_uri, str(recipe.source["content_hash"]), stream, *_compute(device, dtype), record)
    _advance(wc, recipe)
    return wc


@contextmanager
def checkout(base_uri: str, recipe: Recipe, *, stream: bool = False, device: str | None = None,
             dtype: str | None = None, record: SourceRecord | None = None) -> Iterator[Working]:
    """This process's working copy, brought to ``recipe``; the caller may edit it (and must set ``.recipe``).
    ``device``, ``dtype`` and ``record`` as for :func:`load_state`: a copy on another device or in another dtype
    is not reused."""
    global _COPY
    base_hash = str(recipe.source["content_hash"])
    device, dtype = _compute(device, dtype)
    with _LOCK:
        wc = _COPY
        if wc is None or wc.base_hash != base_hash or wc.stream != stream or (wc.device, wc.dtype) != (device, dtype) \
                or not _is_prefix(wc.recipe, recipe):
            _COPY = wc = None
            gc.collect()
            wc = _load(base_uri, base_hash, stream, device, dtype, record)
        else:
            _STATS["reused"] += 1
        try:
            _advance(wc, recipe)
            yield wc
        except BaseException:
            _COPY = None  # possibly half-edited
            raise
        _COPY = wc


def drop() -> None:
    """Forget the working copy (tests; or to free memory)."""
    global _COPY
    with _LOCK:
        _COPY = None
        gc.collect()
