"""Where an output may go, checked before any work: never over a source, never over what the user did not name.

Every command that writes (``prune --out/--json/--plots``, ``apply --out``, ``run --json`` and the pipeline's
store) asks here first, so a typo in a path costs an error line, not a model:

- an output may not equal, contain or lie inside a source it reads (local paths resolved, fsspec URLs compared
  by protocol, bucket and path segments), so ``--model s3://b/m/base --out s3://b/m`` is refused;
- a folder output replaces only an empty folder or, with ``--overwrite``, an earlier prunecomp result
  (:func:`prunecomp.models.storage.check_replace`); ``/``, the home folder, the working directory and the folders above
  them are never outputs;
- a file output (``--json``) replaces an existing file only with ``--overwrite`` and only when prunecomp wrote it
  (:data:`OUTPUT_KEY`); ``--plots`` adds its own named PNGs and replaces earlier ones only with ``--overwrite``.

The atomic writing itself is :mod:`prunecomp.models.storage`.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prunecomp.errors import PrunecompError
from prunecomp.models.storage import check_replace, is_remote, recover_interrupted, write_json

__all__ = ["OUTPUT_KEY", "check_file_output", "check_output", "check_plots_dir", "check_store", "overlap",
           "write_output_json"]

OUTPUT_KEY = "prunecomp_output"
"""Top-level key of every JSON document a command writes for the user; its presence is what lets ``--overwrite``
replace that file later (and nothing else)."""


def _split(uri: str) -> tuple[str, tuple[str, ...]]:
    """``(protocol, path segments)``: local paths resolved (symlinks followed), URLs by their path."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser().resolve()
        return "file", path.parts
    protocol, _, rest = uri.partition("://")
    protocol = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(protocol, protocol)
    return protocol, tuple(p for p in rest.split("?", 1)[0].split("/") if p and p != ".")


def _existing_local(source: str) -> bool:
    return not is_remote(source) and Path(source.removeprefix("file://")).expanduser().exists()


def overlap(out: str, source: str, *, file_as_folder: bool = True) -> str | None:
    """How ``out`` overlaps ``source`` ("is", "contains", "is inside"), or ``None``. A local model file counts
    as its folder (``file_as_folder``: a model's files are read together). Names that are not an existing path
    (hub ids) never overlap."""
    if not is_remote(source) and not _existing_local(source):
        return None
    if file_as_folder and not is_remote(source) and Path(source.removeprefix("file://")).expanduser().is_file():
        source = str(Path(source.removeprefix("file://")).expanduser().resolve().parent)
    (p_out, a), (p_src, b) = _split(out), _split(source)
    if p_out != p_src:
        return None
    if a == b:
        return "is"
    if a == b[:len(a)]:
        return "contains"
    if b == a[:len(b)]:
        return "is inside"
    return None


def _check_sources(out: str, sources: Iterable[str | os.PathLike[str] | None], option: str) -> None:
    for source in sources:
        if source is None or not str(source):
            continue
        how = overlap(out, str(source))
        if how is not None:
            raise PrunecompError(f"{option} {_show(out)!r} {how} the source model {_show(str(source))!r}; write it "
                                 "to a folder apart from the source (the source is never modified)")


def _show(uri: str) -> str:
    from prunecomp.models.redact import redact

    return redact(uri)


def _protected(path: Path) -> str | None:
    """Why a local folder can never be an output that replaces content, or ``None``."""
    resolved = path.expanduser().resolve()
    if resolved == Path(resolved.anchor):
        return "the filesystem root"
    for name, where in (("the home folder", Path.home()), ("the working directory", Path.cwd())):
        with contextlib.suppress(OSError):
            where = where.resolve()
            if resolved == where or resolved in where.parents:
                return name if resolved == where else f"a folder above {name}"
    return None


def _check_creatable(uri: str, option: str) -> None:
    """The nearest existing folder above a local output accepts a new file (probed with a real one, removed at
    once), so an output under ``/proc`` or on a read-only mount fails now, not after an hour of pruning."""
    path = Path(uri.removeprefix("file://")).expanduser()
    probe_root = path.parent
    while not probe_root.exists():
        probe_root = probe_root.parent
    if not probe_root.is_dir():
        raise PrunecompError(f"{option} {uri!r} is not writable: {str(probe_root)!r} is a file, not a folder")
    probe = probe_root / f".prunecomp-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise PrunecompError(f"{option} {uri!r} is not writable: cannot create files in {str(probe_root)!r} "
                             f"({exc.strerror or exc})") from exc
    probe.unlink(missing_ok=True)


def check_output(out: str, *, sources: Iterable[str | os.PathLike[str] | None] = (), overwrite: bool = False,
                 option: str = "--out", inputs: Iterable[str | None] = ()) -> None:
    """Fail before any work when folder output ``out`` overlaps a source, is a protected folder, holds something
    ``overwrite`` may not replace, or cannot be written. ``inputs`` are other files or folders the command reads
    (a recipe): the output may lie beside or inside them, never be or contain them. A local replacement a crashed
    writer left half-done is restored first (:func:`prunecomp.models.storage.recover_interrupted`)."""
    _check_sources(out, sources, option)
    for read in inputs:
        if read and overlap(out, read, file_as_folder=False) in ("is", "contains"):
            raise PrunecompError(f"{option} {_show(out)!r} would replace {_show(read)!r}, which this command "
                                 "reads; write it elsewhere")
    if not is_remote(out):
        path = Path(out.removeprefix("file://")).expanduser()
        why = _protected(path)
        if why is not None:
            raise PrunecompError(f"{option} {out!r} is {why}: an output folder is replaced as a whole, so choose a "
                                 "new folder for it")
        recover_interrupted(path)
        check_replace(out, overwrite=overwrite, option="--overwrite")
        _check_creatable(out, option)
        return
    check_replace(out, overwrite=overwrite, option="--overwrite")
    _probe_remote(out, option)


def _probe_remote(uri: str, option: str) -> None:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        probe = f"{path.rstrip('/')}/.prunecomp-probe-{uuid.uuid4().hex[:8]}"
        fs.pipe(probe, b"")
        fs.rm(probe)
    except Exception as exc:
        raise PrunecompError(f"{option} {_show(uri)!r} is not writable: {type(exc).__name__}: "
                             f"{_show(str(exc))}") from exc


def check_store(store: str, *, sources: Iterable[str | os.PathLike[str] | None] = (),
                probe: str | None = None) -> None:
    """The pipeline's store writes only its own content-keyed folders, so it may hold anything else; it must not be
    (or lie inside) the source model's folder. A source kept inside the store (an earlier run's final model) is
    fine: nothing is written over it. ``probe`` (a folder in the store) is checked writable now, before any work."""
    for source in sources:
        if source is None or not str(source):
            continue
        how = overlap(store, str(source))
        if how in ("is", "is inside"):
            raise PrunecompError(f"store {_show(store)!r} {how} the source model {_show(str(source))!r}; keep the "
                                 "store apart from the models it reads")
    if probe is not None:
        if is_remote(probe):
            _probe_remote(probe, "store")
        else:
            _check_creatable(str(Path(probe.removeprefix("file://")) / "x"), "store")


def check_file_output(path: str, *, sources: Iterable[str | os.PathLike[str] | None] = (), overwrite: bool = False,
                      option: str = "--json") -> None:
    """Fail before any work when file ``path`` overlaps a source, is a folder, already exists (without
    ``overwrite``), or holds a file prunecomp did not write (with it)."""
    _check_sources(path, sources, option)
    if is_remote(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        try:
            exists = fs.exists(p)
            payload = bytes(fs.cat_file(p)) if exists and fs.isfile(p) else None
        except Exception as exc:
            raise PrunecompError(f"{option} {_show(path)!r} cannot be read: {type(exc).__name__}") from exc
        if exists and payload is None:
            raise PrunecompError(f"{option} {_show(path)!r} is a folder; give a file path")
        _check_existing_file(path, payload, overwrite, option)
        return
    local = Path(path.removeprefix("file://")).expanduser()
    if local.is_dir():
        raise PrunecompError(f"{option} {path!r} is a folder; give a file path")
    payload = local.read_bytes() if local.is_file() else None
    _check_existing_file(path, payload, overwrite, option)
    _check_creatable(path, option)


def _check_existing_file(path: str, payload: bytes | None, overwrite: bool, option: str) -> None:
    if payload is None:
        return
    if not overwrite:
        raise PrunecompError(f"{option} {_show(path)!r} already exists; pass --overwrite to replace a JSON file "
                             "prunecomp wrote, or choose a new path")
    try:
        doc = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not (isinstance(doc, dict) and OUTPUT_KEY in doc):
        raise PrunecompError(f"{option} {_show(path)!r} is a file prunecomp did not write; --overwrite replaces "
                             "only prunecomp's own JSON: choose a new path")


def write_output_json(path: str, data: Mapping[str, Any], kind: str) -> str:
    """Write a command's JSON for the user, marked with :data:`OUTPUT_KEY` (``{"kind": ...}``) so that a later
    ``--overwrite`` may replace it."""
    return write_json(path, {**data, OUTPUT_KEY: {"kind": kind}})


def check_plots_dir(plots_dir: str, names: Iterable[str], *, sources: Iterable[str | os.PathLike[str] | None] = (),
                    overwrite: bool = False, option: str = "--plots") -> Path:
    """``--plots`` writes a few named PNGs into a local folder (which may hold other files: none is touched);
    an existing file of one of those names is replaced only with ``overwrite``. Returns the local folder."""
    if is_remote(plots_dir):
        raise PrunecompError(f"{option} writes PNG files to a local folder, got {_show(plots_dir)!r}")
    _check_sources(plots_dir, sources, option)
    folder = Path(plots_dir.removeprefix("file://")).expanduser()
    if folder.exists() and not folder.is_dir():
        raise PrunecompError(f"{option} {plots_dir!r} is a file, not a folder")
    clash = [n for n in names if (folder / n).exists()]
    if clash and not overwrite:
        raise PrunecompError(f"{option} {plots_dir!r} already holds {clash[0]!r}; pass --overwrite to replace the "
                             "plots there, or choose another folder")
    _check_creatable(str(folder / "x"), option)
    return folder
