"""Text corpora for calibration and perplexity, from a local data directory, a file, or the Hugging Face hub.

Named corpora (``wikitext2``, ``c4``, ``ptb``, ``tinystories``) resolve to local files when a data directory laid
out like the project's ``shared/data`` is known, and to hub datasets otherwise. Calibration and evaluation use
disjoint text so that perplexity is never measured on calibration tokens:

=============  ==========================================  ========================================
corpus         calibration (local / hub)                   evaluation (local / hub)
=============  ==========================================  ========================================
wikitext2      wiki2.valid.txt / train                     wiki.test.raw / test
c4             docs 1000-1999 of the sample / en train     docs 0-999 of the sample / en validation
ptb            ptb.valid.txt / train                       ptb.test.txt / test
tinystories    second half of the stories / train          first half / validation
=============  ==========================================  ========================================

Any other ``source`` is read as a local ``.txt``, ``.jsonl`` or ``.parquet`` file (whole file, field ``text``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prunecomp.errors import PrunecompError

__all__ = ["CORPORA", "DATA_DIR_ENV", "Corpus", "load_text", "resolve_data_dir", "text_files"]

DATA_DIR_ENV = "PRUNECOMP_DATA_DIR"
Split = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class Corpus:
    """Where one named corpus lives, locally and on the hub, and how its records are joined into one text."""

    local: dict[str, str]  # split -> path relative to the data dir
    hub: dict[str, tuple[str, str | None, str]]  # split -> (dataset path, config name, split)
    field: str = "text"
    joiner: str = "\n\n"
    local_docs: dict[str, slice] | None = None  # split -> slice of records (one file serving both splits)
    hub_data_files: dict[str, str] | None = None


CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus(
        local={"calibration": "wikitext2/wiki2.valid.txt", "evaluation": "wikitext2/wiki.test.raw"},
        hub={
            "calibration": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
            "evaluation": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
        },
    ),
    "c4": Corpus(
        local={"calibration": "c4/c4_validation_2k.parquet", "evaluation": "c4/c4_validation_2k.parquet"},
        local_docs={"calibration": slice(1000, 2000), "evaluation": slice(0, 1000)},
        hub={"calibration": ("allenai/c4", None, "train"), "evaluation": ("allenai/c4", None, "validation")},
        hub_data_files={
            "calibration": "en/c4-train.00000-of-01024.json.gz",
            "evaluation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
    "ptb": Corpus(
        local={"calibration": "ptb/ptb.valid.txt", "evaluation": "ptb/ptb.test.txt"},
        hub={
            "calibration": ("ptb_text_only", "penn_treebank", "train"),
            "evaluation": ("ptb_text_only", "penn_treebank", "test"),
        },
        field="sentence",
        joiner=" ",
    ),
    "tinystories": Corpus(
        local={"calibration": "tinystories/tinystories_val.txt", "evaluation": "tinystories/tinystories_val.txt"},
        local_docs={"calibration": slice(2000, None), "evaluation": slice(0, 2000)},
        hub={
            "calibration": ("roneneldan/TinyStories", None, "train"),
            "evaluation": ("roneneldan/TinyStories", None, "validation"),
        },
    ),
}


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local data directory: the argument, else ``$PRUNECOMP_DATA_DIR``, else a ``shared/data`` folder beside
    the project checkout (the offline layout of this project's machines), else ``None`` (use the hub).

    A directory that is named explicitly but does not exist is an error, not a silent fallback to the hub.
    """
    explicit = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise PrunecompError(
                f"data directory {str(path)!r} (from --data-dir or ${DATA_DIR_ENV}) does not exist; "
                "point it at a folder laid out like shared/data (c4/, wikitext2/, ptb/, ...)"
            )
        return path.resolve()
    for candidate in (Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"):
        if (candidate / "README.md").is_file():
            return candidate.resolve()
    return None


def text_files(source: str, split: Split, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The local files :func:`load_text` reads for ``source`` and ``split``, resolved as it resolves them; empty
    when the text comes from the hub.

    What a cached result computed from the text depends on: the pipeline puts their content hashes into its
    cache keys, so an edited file (same path, new bytes) is never served from the cache of the old one. A folder
    given as ``source`` counts with every file under it (hidden ones excepted), sorted.
    """
    corpus = CORPORA.get(source.lower())
    if corpus is None:
        path = Path(source).expanduser()
        if path.is_dir():
            return sorted(p.resolve() for p in path.rglob("*") if p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return [path.resolve()] if path.exists() else []
    root = resolve_data_dir(data_dir)
    return [] if root is None else [(root / corpus.local[split]).resolve()]


def _read_records(path: Path) -> list[str]:
    """Records of a local file: paragraphs/lines of text, or the ``text`` field of jsonl/parquet rows."""
    if not path.is_file():
        raise PrunecompError(f"text file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            column = "text" if "text" in table.column_names else table.column_names[0]
            return [str(x) for x in table.column(column).to_pylist()]
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return [str(r["text"]) if isinstance(r, dict) else str(r) for r in rows]
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except (OSError, ValueError, KeyError) as exc:
        raise PrunecompError(f"cannot read text from {str(path)!r}: {exc}") from exc
    if "\n\n" in text:  # paragraphs (stories, articles)
        return [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    return [line for line in text.split("\n") if line.strip()]


def _read_hub(corpus_name: str, corpus: Corpus, split: Split, load: Callable[..., object] | None) -> list[str]:
    path, config, hub_split = corpus.hub[split]
    data_files = corpus.hub_data_files[split] if corpus.hub_data_files else None
    try:
        if load is None:
            from datasets import load_dataset as load
        kwargs = {"data_files": {hub_split: data_files}} if data_files else {}
        ds = load(path, config, split=hub_split, **kwargs)
        return [str(x) for x in ds[corpus.field] if str(x).strip()]  # type: ignore[index]
    except Exception as exc:  # hub errors come in many types; all mean the same to the user
        raise PrunecompError(
            f"could not load corpus {corpus_name!r} from the Hugging Face hub ({path}, split {hub_split}): "
            f"{type(exc).__name__}: {str(exc)[:200]}. Without internet, point --data-dir or ${DATA_DIR_ENV} at a "
            f"local copy laid out like shared/data (expected file: {corpus.local[split]})."
        ) from exc


def load_text(
    source: str,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hub_loader: Callable[..., object] | None = None,
) -> tuple[str, str]:
    """Return ``(text, origin)`` for a named corpus or a local file; ``origin`` says exactly what was read."""
    corpus = CORPORA.get(source.lower())
    if corpus is None:
        path = Path(source).expanduser()
        if not path.exists():
            raise PrunecompError(
                f"unknown text source {source!r}: expected one of {', '.join(CORPORA)} or an existing "
                ".txt/.jsonl/.parquet file"
            )
        records = _read_records(path)
        origin = str(path.resolve())
        joiner = "\n\n"
    else:
        root = resolve_data_dir(data_dir)
        if root is not None:
            path = root / corpus.local[split]
            records = _read_records(path)
            if corpus.local_docs is not None:
                records = records[corpus.local_docs[split]]
            origin = f"{path}" + (f"[{corpus.local_docs[split].start}:{corpus.local_docs[split].stop}]"
                                  if corpus.local_docs else "")
        else:
            records = _read_hub(source, corpus, split, hub_loader)
            origin = "hf://{}/{}:{}".format(*corpus.hub[split][:1], corpus.hub[split][1], corpus.hub[split][2])
        joiner = corpus.joiner
    text = joiner.join(records)
    if not text.strip():
        raise PrunecompError(f"text source {source!r} ({split}) is empty")
    return text, origin
