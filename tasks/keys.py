"""Cache keys: stable hashes of what determines a result, and the code version that computed it.

Every cached task result is keyed by a :func:`stable_hash` of plain scalars (content hashes, validated configs,
step numbers, the code version, the device type and dtype, and the store it lives in), never of live objects:
tensors and modules hash differently in every process, so they would never hit the cache. Prefect-free.

Files a result is computed from enter keys by content, and each process that reads them again checks that they
are still what was hashed:

* data files (a calibration or evaluation text, the files of ``--data-dir`` a corpus resolves to):
  :func:`fingerprint_files` hashes them once per process (cached by path, size and mtime) into
  :class:`DataFile` records, whose sha256 enters the key and whose size and mtime let a later reader
  (:func:`check_files`) tell an untouched file from one to hash again;
* model sources: hashed once per run by the flow (:func:`prunecomp.models.sources.content_hash`), which records each
  file's size and mtime, or an object store's ETag and version id, in a :class:`SourceRecord`; whoever loads the
  source from its URI later, in any process, compares those stamps first (:func:`check_source`), so a source
  that changed under its URI is refused rather than served under the old hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from prunecomp.errors import PrunecompError
from prunecomp.models.redact import redact
from prunecomp.models.storage import is_remote

__all__ = ["CODE_VERSION_ENV", "MISSING", "NUMERIC_LIBRARIES", "DataFile", "SourceRecord", "check_files",
           "check_source", "code_files", "code_version", "default_device", "default_dtype", "file_record",
           "fingerprint_files", "library_versions", "model_state_hash", "record_source", "recorded_source",
           "source_digest", "source_stamps", "stable_hash"]

CODE_VERSION_ENV = "PRUNECOMP_CODE_VERSION"
# The CLI package prints and parses options, it changes no number; everything else in prunecomp/ may.
_NOT_NUMERIC = ("prunecomp/cli/",)


def stable_hash(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (pydantic models dumped in JSON mode)."""

    def plain(obj: Any) -> Any:
        if hasattr(obj, "model_dump"):
            return obj.model_dump(mode="json")
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, tuple | set | frozenset):
            return [plain(x) for x in (sorted(obj) if isinstance(obj, set | frozenset) else obj)]
        if isinstance(obj, dict):
            return {str(k): plain(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [plain(x) for x in obj]
        return obj

    payload = json.dumps(plain(list(parts)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# Libraries whose version can change a cached number (kernels, loading, lm-eval's scoring).
NUMERIC_LIBRARIES = ("torch", "transformers", "safetensors", "accelerate", "gguf", "lm-eval", "datasets")


def code_files() -> list[tuple[str, Path]]:
    """Every file whose content can change a cached result: the library's Python and its shipped task configs
    (QA YAMLs), and the task modules that compute what they cache. Names relative to the repository root."""
    import prunecomp
    import tasks

    out: list[tuple[str, Path]] = []
    for package in (prunecomp, tasks):
        root = Path(package.__file__).resolve().parent
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.yaml"), *root.rglob("*.json")]):
            name = f"{root.name}/{path.relative_to(root).as_posix()}"
            if name.startswith(_NOT_NUMERIC) or "__pycache__" in path.parts:
                continue
            out.append((name, path))
    return out


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def source_digest(files: list[tuple[str, Path]], versions: dict[str, str]) -> str:
    """sha256 over the files (names and bytes) and the library versions."""
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode())
        h.update(path.read_bytes())
    h.update(json.dumps(versions, sort_keys=True).encode())
    return h.hexdigest()


@cache
def code_version() -> str:
    """``<package version>+<12 hex>`` over everything that computes a cached result, or ``$PRUNECOMP_CODE_VERSION``.

    Covered: every ``prunecomp/`` source and shipped config (QA task YAMLs), every ``tasks/`` module, and the
    versions of the libraries that change numbers (:data:`NUMERIC_LIBRARIES`). A source hash rather than the version
    string alone: during development the version does not move while the scoring code does, and a cached step
    computed by older code must not be reused. Left out, on purpose: ``prunecomp/cli/`` (prints, changes no number),
    ``flows/`` (wiring: every number it keeps comes from a task, keyed here) and the CUDA/driver version (the
    device type and dtype are job fields, see :mod:`tasks.jobs`; the data files are keyed by content there too).
    Pin it with the environment variable to share caches across trivial edits on purpose.
    """
    pinned = os.environ.get(CODE_VERSION_ENV)
    if pinned:
        return pinned
    try:
        from importlib.metadata import version

        pkg = version("prunecomp")
    except Exception:  # not installed (e.g. a bare checkout on PYTHONPATH)
        pkg = "0"
    return f"{pkg}+{source_digest(code_files(), library_versions())[:12]}"


def model_state_hash(model: Any) -> str:
    """sha256 over the model config and every tensor of its state dict (name, dtype, shape, bytes).

    Hashes what the model *is*, independent of how the file was serialised, so a checkpoint written by an
    interrupted-and-resumed run and one from an uninterrupted run compare equal exactly when their tensors do.
    """
    import torch

    h = hashlib.sha256()
    config = model.config.to_dict()
    # Filled in or rewritten by save_pretrained (a GGUF-loaded model has no `architectures` until saved).
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_device() -> str:
    """The device type the pipeline computes on: ``cuda`` when a GPU is visible, else ``cpu``; the library's own
    default (:func:`prunecomp.models.sources.load_model`, :class:`prunecomp.engine.streamed.StreamedModel`), made a job
    field so that it is in the key and the task loads with what the key says."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """The compute dtype on ``device``: bf16 on CUDA, fp32 elsewhere (the library's default)."""
    return "bfloat16" if device == "cuda" else "float32"


MISSING = "missing"
"""The sha256 of a data file that does not exist: its reader reports that, with its own message, when it runs."""


class DataFile(BaseModel):
    """A local file a result is read from: its content hash (in keys) and the size and mtime it had when hashed
    (not in keys: two copies of the same bytes share results; they tell a later reader whether to hash again)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    size: int
    mtime_ns: int


_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_record(path: Path) -> DataFile:
    """``path``'s :class:`DataFile`, hashed at most once per process for each (path, size, mtime)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return DataFile(path=str(path), sha256=MISSING, size=-1, mtime_ns=-1)
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        known = _FILE_HASHES.get(key)
    if known is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise PrunecompError(f"data file {str(path)!r} changed while it was being hashed; run again")
        known = h.hexdigest()
        with _HASH_LOCK:
            _FILE_HASHES[key] = known
    return DataFile(path=str(path), sha256=known, size=st.st_size, mtime_ns=st.st_mtime_ns)


def fingerprint_files(paths: Iterable[Path]) -> tuple[DataFile, ...]:
    """The :class:`DataFile` of each path (sorted, once each): what a job records of the files it reads."""
    return tuple(file_record(p) for p in sorted(set(paths)))


def check_files(recorded: Sequence[DataFile], paths: Iterable[Path]) -> None:
    """Refuse to read data files other than the ones a job's key was computed from.

    ``paths``: the files the task is about to read, resolved in this process (a different data folder or working
    directory can resolve a corpus elsewhere). A file whose size and mtime are the recorded ones is taken as
    unchanged; any other is hashed again, and new content is an error (a run started now keys the new content).
    """
    wanted = sorted({str(p) for p in paths})
    have = sorted({f.path for f in recorded})
    if wanted != have:
        raise PrunecompError(f"this job was keyed with the data files {have}, but here they resolve to {wanted}; "
                             "give the run the same data folder (--data-dir) as the process that built the job")
    for f in recorded:
        path = Path(f.path)
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is None and f.sha256 == MISSING:
            continue
        if st is not None and (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns):
            continue
        now = file_record(path)
        if now.sha256 != f.sha256:
            raise PrunecompError(f"data file {f.path!r} changed after this run hashed it (sha256 {f.sha256[:12]}, "
                                 f"now {now.sha256[:12]}); run again to key its new content")


class SourceRecord(BaseModel):
    """A model source as it was when its content hash was computed: ``stamps`` maps each file of the folder (or
    the single file) to its size and mtime, or, on an object store, its ETag, version id and size. Comparing
    stamps tells another process, without reading the weights again, whether the bytes behind ``uri`` are still
    the ones hashed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    content_hash: str
    stamps: dict[str, str]


def _remote_stamp(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""
    version = info.get("VersionId") or info.get("version_id") or info.get("generation") or ""
    when = "" if etag else str(info.get("LastModified") or info.get("mtime") or info.get("updated") or "")
    return f"etag={str(etag).strip(chr(34))};version={version};size={info.get('size')}{f';at={when}' if when else ''}"


def source_stamps(uri: str) -> dict[str, str]:
    """Stamps of the files at ``uri`` (a folder: its top-level files, which are what a model source is read
    from; or one file): ``size:mtime_ns`` locally, ETag / version id / size on an object store (asked afresh,
    not from fsspec's listing cache)."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() \
            else []
        out = {}
        for p in files:
            st = p.stat()
            out[p.name] = f"{st.st_size}:{st.st_mtime_ns}"
        return out
    import fsspec

    fs, inner = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(inner)
    try:
        if fs.isfile(inner):
            return {inner.rstrip("/").rsplit("/", 1)[-1]: _remote_stamp(fs.info(inner))}
        entries = fs.ls(inner, detail=True)
    except FileNotFoundError:
        return {}
    return {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: _remote_stamp(e)
            for e in entries if e.get("type") == "file"}


_SOURCES: dict[str, SourceRecord] = {}
_SOURCES_LOCK = threading.Lock()


def record_source(uri: str, content_hash: str, stamps: dict[str, str]) -> SourceRecord:
    """Remember, for this process, that ``uri`` had ``content_hash`` when its files had ``stamps`` (taken before
    hashing, and checked unchanged after it); job specs built from then on carry it (:mod:`tasks.jobs`)."""
    record = SourceRecord(uri=uri, content_hash=content_hash, stamps=stamps)
    with _SOURCES_LOCK:
        _SOURCES[uri] = record
    return record


def recorded_source(uri: str | None) -> SourceRecord | None:
    """This process's record of ``uri`` (:func:`record_source`), if any."""
    if uri is None:
        return None
    with _SOURCES_LOCK:
        return _SOURCES.get(uri)


def check_source(record: SourceRecord, expected_hash: str) -> None:
    """Refuse a model source whose files are not the ones hashed into ``expected_hash``: the record must be of
    that hash, and every file must still carry its recorded stamp (a new, missing or changed file is an error;
    the next run hashes the source again and keys the new content)."""
    if record.content_hash != expected_hash:
        raise PrunecompError(f"model {redact(record.uri)!r} was recorded with content {record.content_hash[:12]}, "
                             f"not the {expected_hash[:12]} this job was keyed by; run again")
    now = source_stamps(record.uri)
    if now != record.stamps:
        changed = sorted(n for n in {*now, *record.stamps} if now.get(n) != record.stamps.get(n))
        raise PrunecompError(f"model {redact(record.uri)!r} changed after this run hashed it ({', '.join(changed)}: "
                             f"new, missing or rewritten); run again to hash and key its new content")
