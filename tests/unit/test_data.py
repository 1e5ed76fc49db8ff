"""Calibration and evaluation text: local sources, determinism, digests, and clear errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from prunecomp.corpora.calibration import calibration_windows, evaluation_windows, tokenize_windows
from prunecomp.corpora.data import DATA_DIR_ENV, load_text, resolve_data_dir
from prunecomp.errors import PrunecompError


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


def test_calibration_is_deterministic_and_hashed(tok, data_dir) -> None:
    a = calibration_windows(tok, "tinystories", n_samples=4, seq_len=64, seed=3, data_dir=data_dir)
    b = calibration_windows(tok, "tinystories", n_samples=4, seq_len=64, seed=3, data_dir=data_dir)
    c = calibration_windows(tok, "tinystories", n_samples=4, seq_len=64, seed=4, data_dir=data_dir)
    assert a.ids.shape == (4, 64)
    assert (a.ids[:, 0] == tok.bos_token_id).all()
    assert a.digest == b.digest and a.ids.equal(b.ids)
    assert c.digest != a.digest
    assert "tinystories_val.txt[2000:None]" in a.origin


def test_calibration_and_evaluation_text_are_disjoint(data_dir) -> None:
    for name in ("c4", "tinystories", "wikitext2", "ptb"):
        cal, cal_origin = load_text(name, "calibration", data_dir)
        ev, ev_origin = load_text(name, "evaluation", data_dir)
        assert cal_origin != ev_origin
        assert cal[:2000] not in ev


def test_evaluation_windows_are_contiguous(tok, data_dir) -> None:
    w = evaluation_windows(tok, "tinystories", seq_len=32, max_windows=3, data_dir=data_dir)
    assert w.ids.shape == (3, 32)
    text, _ = load_text("tinystories", "evaluation", data_dir)
    body = tok(text, add_special_tokens=False)["input_ids"][: 3 * 31]
    assert w.ids[:, 1:].reshape(-1).tolist() == body


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_file_sources(tok, tmp_path, suffix: str) -> None:
    docs = [f"Story number {i}: the cat sat on the mat and looked at the dog." for i in range(40)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(docs))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    else:
        pq.write_table(pa.table({"text": docs}), path)
    w = calibration_windows(tok, str(path), n_samples=3, seq_len=16, seed=0)
    assert w.ids.shape == (3, 16)
    assert str(path) in w.origin


def test_too_short_and_empty_text(tok, tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    with pytest.raises(PrunecompError, match="too short"):
        calibration_windows(tok, str(short), n_samples=2, seq_len=512)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n ")
    with pytest.raises(PrunecompError, match="empty"):
        calibration_windows(tok, str(empty), n_samples=2, seq_len=16)
    with pytest.raises(PrunecompError, match="unknown text source"):
        calibration_windows(tok, "no-such-corpus", n_samples=2, seq_len=16)
    with pytest.raises(PrunecompError, match="positive"):
        tokenize_windows(tok, "a b c d e f g", "x", seq_len=4, n_windows=0, seed=0)


def test_data_dir_resolution(monkeypatch, tmp_path, data_dir) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(PrunecompError, match="does not exist"):
        resolve_data_dir()
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert resolve_data_dir() == data_dir.resolve()
    assert resolve_data_dir(str(data_dir)) == data_dir.resolve()


def test_hub_failure_says_how_to_use_local_copies(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr("prunecomp.corpora.data.resolve_data_dir", lambda _d=None: None)

    def offline(*_a, **_k):
        raise ConnectionError("no network")

    with pytest.raises(PrunecompError, match=r"PRUNECOMP_DATA_DIR.*c4/c4_validation_2k.parquet"):
        load_text("c4", "evaluation", hub_loader=offline)
    calls = []

    def fake(path, config, split, **kw):
        calls.append((path, config, split, kw))
        return {"text": ["hello world", "", "second doc"]}

    text, origin = load_text("wikitext2", "evaluation", hub_loader=fake)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test", {})]
    assert text == "hello world\n\nsecond doc" and origin.startswith("hf://Salesforce/wikitext")


def test_shared_data_beside_the_checkout_is_found_from_any_working_directory(tmp_path, monkeypatch) -> None:
    """Without --data-dir or $PRUNECOMP_DATA_DIR, a ``shared/data`` beside the checkout is found from where the
    package lies, not only from the working directory (benchmarks run their children elsewhere)."""
    from pathlib import Path

    from tests.needs_shared import missing

    beside = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (beside / "README.md").is_file():
        missing("../shared/data is not beside the checkout")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir() == beside.resolve()
