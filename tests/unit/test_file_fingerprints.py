"""Which local files a corpus is read from, their content fingerprints (hashed once per process), and the checks a
later reader makes against what was recorded: the data files and model sources behind the pipeline's cache keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from prunecomp.corpora.data import load_text, text_files
from prunecomp.errors import PrunecompError
from tasks import keys
from tasks.keys import (
    check_files,
    check_source,
    file_record,
    fingerprint_files,
    record_source,
    recorded_source,
    source_stamps,
)


def _data_dir(root: Path) -> Path:
    """A data folder laid out like shared/data, with TinyStories and PTB only."""
    (root / "tinystories").mkdir(parents=True)
    (root / "tinystories" / "tinystories_val.txt").write_text("\n\n".join(f"story {i}" for i in range(10)))
    (root / "ptb").mkdir()
    (root / "ptb" / "ptb.valid.txt").write_text("a valid line\nanother\n")
    (root / "ptb" / "ptb.test.txt").write_text("a test line\n")
    return root


def _rewrite(path: Path, text: str) -> None:
    """New content with a new mtime (as an editor's save has), so that the change is not a same-nanosecond one."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_text_files_are_the_files_load_text_reads(tmp_path: Path) -> None:
    root = _data_dir(tmp_path / "data")
    assert text_files("ptb", "calibration", root) == [(root / "ptb" / "ptb.valid.txt").resolve()]
    assert text_files("ptb", "evaluation", root) == [(root / "ptb" / "ptb.test.txt").resolve()]
    # one file serving both splits: the same file, not the folder
    assert text_files("tinystories", "evaluation", root) == [(root / "tinystories" / "tinystories_val.txt").resolve()]
    _, origin = load_text("ptb", "calibration", root)
    assert Path(origin).resolve() == text_files("ptb", "calibration", root)[0]
    own = tmp_path / "mine.txt"
    own.write_text("some calibration text\n")
    assert text_files(str(own), "calibration") == [own.resolve()]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / ".hidden").write_text("not read")
    want = [(folder / "a.txt").resolve(), (folder / "sub" / "b.txt").resolve()]
    assert text_files(str(folder), "calibration") == want


def test_no_local_files_for_hub_corpora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prunecomp.corpora.data as data

    monkeypatch.setattr(data, "resolve_data_dir", lambda data_dir=None: None)
    assert text_files("wikitext2", "evaluation", None) == []


def test_a_file_is_hashed_once_per_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cal.txt"
    path.write_text("first content\n")
    calls = []

    class Counting:
        @staticmethod
        def sha256() -> hashlib._Hash:
            calls.append(1)
            return hashlib.sha256()

    monkeypatch.setattr(keys, "hashlib", Counting)
    first = file_record(path)
    assert first.sha256 == hashlib.sha256(b"first content\n").hexdigest() and first.size == path.stat().st_size
    assert file_record(path) == first and len(calls) == 1  # same (path, size, mtime): not read again
    _rewrite(path, "second content\n")
    second = file_record(path)
    assert second.sha256 == hashlib.sha256(b"second content\n").hexdigest() and len(calls) == 2
    assert file_record(tmp_path / "absent.txt").sha256 == keys.MISSING


def test_a_later_reader_trusts_the_recorded_stamp_and_refuses_new_content(tmp_path: Path) -> None:
    path = tmp_path / "cal.txt"
    path.write_text("recorded content\n")
    recorded = fingerprint_files([path])
    check_files(recorded, [path])  # untouched
    os.utime(path, ns=(1, 1))  # touched, same bytes: hashed again, accepted
    check_files(recorded, [path])
    _rewrite(path, "edited content!!\n")  # same path, new bytes
    with pytest.raises(PrunecompError, match="changed after this run hashed it"):
        check_files(recorded, [path])
    with pytest.raises(PrunecompError, match="resolve to"):
        check_files(recorded, [tmp_path / "other.txt"])


def test_a_model_source_checked_against_its_record(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "sub").mkdir()  # only the top-level files are what a source is read from
    record = record_source(str(folder), "h" * 64, source_stamps(str(folder)))
    assert recorded_source(str(folder)) == record and set(record.stamps) == {"config.json", "model.safetensors"}
    check_source(record, "h" * 64)
    with pytest.raises(PrunecompError, match="not the"):
        check_source(record, "g" * 64)
    _rewrite(folder / "config.json", '{"changed": true}')
    with pytest.raises(PrunecompError, match=r"changed after this run hashed it \(config.json"):
        check_source(record, "h" * 64)
    fresh = record_source(str(folder), "h" * 64, source_stamps(str(folder)))
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(PrunecompError, match=r"tokenizer\.json"):
        check_source(fresh, "h" * 64)
