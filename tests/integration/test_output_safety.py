"""Outputs replace only what prunecomp wrote: never a source, never a folder holding anything else, the same rules
on local disk and on a local S3 server, for ``--out``, ``--json``, ``--plots``, ``apply`` and the store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from prunecomp.cli import main
from prunecomp.errors import PrunecompError
from prunecomp.models.outputs import OUTPUT_KEY, check_file_output, check_output, check_store, overlap
from prunecomp.models.storage import MARKER, is_complete, is_prunecomp_result, write_dir

pytestmark = pytest.mark.integration

FAST = ["--calib-source", "tinystories", "--calib-samples", "4", "--calib-seq-len", "64",
        "--eval-datasets", "", "--layers", "1", "--compensation", "magnitude"]


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fill(names: tuple[str, ...], version: str = "v1"):
    def fill(tmp: Path) -> None:
        for name in names:
            (tmp / name).write_text(f"{name}:{version}")

    return fill


@pytest.fixture
def workspace(stories_dir, tmp_path) -> Path:
    """``DIR/model`` (a copy of the real small model) and an unrelated file ``DIR/notes.txt``."""
    shutil.copytree(stories_dir, tmp_path / "model")
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path


def test_overwrite_onto_the_parent_of_the_source_is_refused(workspace) -> None:
    before = _tree(workspace)
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(workspace), "--overwrite")
    assert code == 2 and text.strip().startswith("error:") and "contains the source model" in text
    assert "Traceback" not in text and _tree(workspace) == before


def test_apply_onto_the_parent_of_the_source_is_refused(workspace, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("pruned") / "p"
    code, _ = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(out))
    assert code == 0
    before = _tree(workspace)
    code, text = _invoke("apply", str(out), "--model", str(workspace / "model"), "--out", str(workspace),
                         "--overwrite")
    assert code == 2 and "contains the source model" in text and _tree(workspace) == before


def test_overwrite_replaces_only_an_earlier_prunecomp_result(workspace, tmp_path) -> None:
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "data.bin").write_bytes(b"precious")
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(other), "--overwrite")
    assert code == 2 and "prunecomp did not write" in text and "data.bin" in text
    assert (other / "data.bin").read_bytes() == b"precious"
    ours = tmp_path / "ours"
    assert _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(ours))[0] == 0
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(ours))
    assert code == 2 and "--overwrite" in text
    assert _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(ours), "--overwrite")[0] == 0
    (ours / "extra.txt").write_text("added by hand")  # no longer only prunecomp's: never replaced
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(ours), "--overwrite")
    assert code == 2 and "extra.txt" in text and (ours / "extra.txt").is_file()


@pytest.mark.parametrize("where", ["root", "home", "cwd", "above-cwd"])
def test_protected_folders_are_never_outputs(where, tmp_path, monkeypatch) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    target = {"root": "/", "home": str(Path.home()), "cwd": ".", "above-cwd": str(tmp_path)}[where]
    with pytest.raises(PrunecompError, match="choose a new folder"):
        check_output(target, overwrite=True)


def test_json_onto_a_source_file_or_a_foreign_file_is_refused(workspace, tmp_path) -> None:
    config = workspace / "model" / "config.json"
    before = config.read_bytes()
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(tmp_path / "o1"),
                         "--json", str(config), "--overwrite")
    assert code == 2 and "--json" in text and "source model" in text
    assert config.read_bytes() == before and not (tmp_path / "o1").exists()
    foreign = tmp_path / "settings.json"
    foreign.write_text('{"keep": true}')
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(tmp_path / "o2"),
                         "--json", str(foreign))
    assert code == 2 and "already exists" in text and not (tmp_path / "o2").exists()
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(tmp_path / "o3"),
                         "--json", str(foreign), "--overwrite")
    assert code == 2 and "did not write" in text and json.loads(foreign.read_text()) == {"keep": True}
    ours = tmp_path / "result.json"
    assert _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(tmp_path / "o4"),
                   "--json", str(ours))[0] == 0
    assert OUTPUT_KEY in json.loads(ours.read_text())
    check_file_output(str(ours), overwrite=True)  # prunecomp's own JSON may be replaced


def test_plots_never_replace_without_overwrite_and_never_go_into_the_source(workspace, tmp_path) -> None:
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(tmp_path / "o"),
                         "--plots", str(workspace / "model" / "plots"))
    assert code == 2 and "--plots" in text and not (workspace / "model" / "plots").exists()
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "layer_scores.png").write_bytes(b"not ours")
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", str(tmp_path / "o"),
                         "--plots", str(plots))
    assert code == 2 and "layer_scores.png" in text and (plots / "layer_scores.png").read_bytes() == b"not ours"


def test_unwritable_output_is_one_error_line(workspace) -> None:
    code, text = _invoke("prune", "--model", str(workspace / "model"), *FAST, "--out", "/proc/prunecomp-x")
    assert code == 2 and text.strip().startswith("error:") and "not writable" in text and "Traceback" not in text


def test_store_inside_the_source_is_refused(workspace) -> None:
    with pytest.raises(PrunecompError, match=r"store .* the source model"):
        check_store(str(workspace / "model" / "store"), sources=[str(workspace / "model")])
    check_store(str(workspace / "store"), sources=[str(workspace / "model")])  # beside it: fine


def test_a_crash_between_the_two_renames_restores_the_previous_result(tmp_path) -> None:
    """The writer moved the old result aside and died before moving the new one in: the next write (or output
    check) puts the old result back, readable, instead of deleting it as a leftover."""
    target = tmp_path / "out"
    write_dir(str(target), _fill(("a.txt",)))
    code = ("import os, sys; os.replace(sys.argv[1], sys.argv[2])")  # a process that dies right after rename 1
    aside = tmp_path / ".out.old-{pid}-deadbeef"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0)"])
    proc.wait()  # a pid that is gone
    aside = Path(str(aside).format(pid=proc.pid))
    subprocess.run([sys.executable, "-c", code, str(target), str(aside)], check=True)
    assert not target.exists() and aside.is_dir()
    with pytest.raises(PrunecompError, match="already exists"):
        write_dir(str(target), _fill(("b.txt",), "v2"))  # no --overwrite: refused, but the old result is back
    assert is_complete(str(target)) and (target / "a.txt").read_text() == "a.txt:v1" and not aside.exists()
    write_dir(str(target), _fill(("b.txt",), "v2"), overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "b.txt"]


def test_marker_lists_what_was_written(tmp_path) -> None:
    write_dir(str(tmp_path / "r"), _fill(("a.txt", "b.txt")))
    assert json.loads((tmp_path / "r" / MARKER).read_text()) == {"writer": "prunecomp", "files": ["a.txt", "b.txt"]}
    assert is_prunecomp_result(str(tmp_path / "r"))
    (tmp_path / "r" / "c.txt").write_text("x")
    assert not is_prunecomp_result(str(tmp_path / "r"))


def test_overlap_of_urls() -> None:
    assert overlap("s3://b/m", "s3://b/m/base") == "contains"
    assert overlap("s3://b/m/base/x", "s3://b/m/base") == "is inside"
    assert overlap("s3://b/m/base/", "s3://b/m/base") == "is"
    assert overlap("s3://b/m/basement", "s3://b/m/base") is None
    assert overlap("s3://other/m", "s3://b/m") is None
    assert overlap("/tmp/x", "meta-llama/Llama-3-8B") is None  # a hub id is not a path
