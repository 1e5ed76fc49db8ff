"""Models and outputs on S3 through fsspec/s3fs, against a real local S3 server (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
import torch

from prunecomp.errors import PrunecompError
from prunecomp.models.outputs import check_file_output, check_output
from prunecomp.models.pruning import remove_layer
from prunecomp.models.sources import load_model
from prunecomp.models.storage import MARKER, is_complete, is_prunecomp_result, write_dir
from prunecomp.recipes.checkpoint import save_pruned

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[object]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "PRUNECOMP_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}.items():
        mp.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("models")
    try:
        yield fs
    finally:
        mp.undo()
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_load_from_s3_prune_and_save_back(s3, stories_dir) -> None:
    fs = s3
    for f in stories_dir.iterdir():
        if f.is_file():
            fs.put_file(str(f), f"models/stories/{f.name}")
    local = load_model(str(stories_dir))
    remote = load_model("s3://models/stories")
    assert remote.source.kind == "remote" and remote.content_hash == local.content_hash
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(remote.model(ids).logits, local.model(ids).logits)
    remove_layer(remote.model, 2)
    check_output("s3://models/pruned", sources=["s3://models/stories"])
    save_pruned(remote.model, remote.tokenizer, "s3://models/pruned", report={"removed": [2]})
    assert is_complete("s3://models/pruned")
    assert fs.exists("models/pruned/model.safetensors")
    with pytest.raises(PrunecompError, match="already exists and is not empty; pass --overwrite"):
        check_output("s3://models/pruned")
    check_output("s3://models/pruned", overwrite=True)  # an earlier prunecomp result: may be replaced
    again = load_model("s3://models/pruned")
    assert again.model.config.num_hidden_layers == 4


def test_missing_s3_model_is_a_clear_error(s3) -> None:
    with pytest.raises(PrunecompError, match="does not exist"):
        load_model("s3://models/no-such-model")
    with pytest.raises(PrunecompError, match="not writable"):
        check_output("s3://no-such-bucket/out")


def test_stale_temp_folders_of_dead_writers_are_cleaned(tmp_path) -> None:
    """A SIGKILLed writer leaves ``.<name>.tmp-<pid>-*``; the next write of that target removes it when the pid
    is gone, and leaves a live writer's alone."""
    import os
    import subprocess

    from prunecomp.models.storage import write_dir

    target = tmp_path / "result"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        stale = tmp_path / f".result.tmp-{dead.pid}-deadbeef"
        busy = tmp_path / f".result.tmp-{live.pid}-cafecafe"
        for d in (stale, busy):
            d.mkdir()
            (d / "model.safetensors").write_bytes(b"partial")
        write_dir(str(target), lambda p: (p / "x.json").write_text("{}"))
        assert (target / "x.json").is_file() and not stale.exists() and busy.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".result.") and p != busy]
        assert os.getpid() != dead.pid
    finally:
        live.kill()
        live.wait()


def test_each_process_downloads_into_its_own_folder(s3, stories_dir, tmp_path) -> None:
    """Fanned-out tasks in other processes reading the same model URL never delete each other's copy; one process
    downloads a URL once; a finished process's copy is cleaned by the next download."""
    import os
    import subprocess
    import sys

    from prunecomp.models.sources import resolve_source

    for f in stories_dir.iterdir():
        if f.is_file():
            s3.put_file(str(f), f"models/dl/{f.name}")
    code = ("import sys, time; from prunecomp.models.sources import resolve_source; "
            "print(resolve_source('s3://models/dl').local_dir, flush=True); time.sleep(float(sys.argv[1]))")
    env = dict(os.environ)
    alive = subprocess.Popen([sys.executable, "-c", code, "60"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        other = alive.stdout.readline().strip()  # type: ignore[union-attr]
        done = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True, env=env,
                              timeout=120).stdout.strip()
        mine = resolve_source("s3://models/dl").local_dir
        assert resolve_source("s3://models/dl").local_dir == mine  # downloaded once in this process
        assert os.path.isdir(other) and (mine / "model.safetensors").is_file()  # the live process's copy stays
        assert not os.path.exists(done)  # the finished process's copy was cleaned
    finally:
        alive.kill()
        alive.wait()


def _fill(version: str, names: tuple[str, ...]):
    def fill(tmp) -> None:
        for name in names:
            (tmp / name).write_text(f"{name}:{version}")

    return fill


def _read(fs, path: str) -> dict[str, str]:
    """File name -> content; the marker's content is its manifest, shown as the files it lists."""
    out = {p.rsplit("/", 1)[1]: fs.cat(p).decode() for p in fs.find(path)}
    if MARKER in out:
        out[MARKER] = ",".join(json.loads(out[MARKER])["files"])
    return out


def test_s3_overwrite_never_loses_the_old_result_before_the_new_one_is_complete(s3, monkeypatch) -> None:
    from prunecomp.models.storage import write_dir

    fs = s3
    write_dir("s3://models/out", _fill("v1", ("a.txt", "b.txt")))
    assert _read(fs, "models/out") == {"a.txt": "a.txt:v1", "b.txt": "b.txt:v1", "_COMPLETE": "a.txt,b.txt"}
    real, calls = fs.put_file, []

    def failing(lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            raise ConnectionError("network gone mid-upload")
        return real(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", failing)  # fsspec caches the instance: the one write_dir uses
    with pytest.raises(PrunecompError, match="previous content, if any, is untouched"):
        write_dir("s3://models/out", _fill("v2", ("a.txt", "c.txt")), overwrite=True)
    monkeypatch.undo()
    fs.invalidate_cache()
    assert _read(fs, "models/out") == {"a.txt": "a.txt:v1", "b.txt": "b.txt:v1", "_COMPLETE": "a.txt,b.txt"}
    assert is_complete("s3://models/out") and not [p for p in fs.ls("models") if "staging" in p]
    write_dir("s3://models/out", _fill("v2", ("a.txt", "c.txt")), overwrite=True)
    fs.invalidate_cache()
    assert _read(fs, "models/out") == {"a.txt": "a.txt:v2", "c.txt": "c.txt:v2", "_COMPLETE": "a.txt,c.txt"}
    assert not [p for p in fs.ls("models") if "staging" in p]


def test_stale_staging_of_a_killed_writer_is_cleaned_by_the_next_write(s3) -> None:
    """A writer SIGKILLed mid-upload leaves ``<path>.staging-<time>-<id>`` on the store (no pid to check, no
    rename): the next write beside it removes leftovers older than a day and leaves a live writer's fresh one."""
    import time

    from prunecomp.models.storage import write_dir

    fs = s3
    old = f"models/kept.staging-{int(time.time()) - 2 * 86400}-deadbeef0000"
    fresh = f"models/kept.staging-{int(time.time()) - 60}-cafebabe0000"
    other = f"models/other.staging-{int(time.time()) - 2 * 86400}-deadbeef0000"  # another path's: not ours
    for prefix in (old, fresh, other):
        fs.pipe(f"{prefix}/model.safetensors", b"partial")
    fs.invalidate_cache()
    write_dir("s3://models/kept", _fill("v1", ("a.txt",)))
    fs.invalidate_cache()
    left = {p.rsplit("/", 1)[-1] for p in fs.ls("models") if "staging" in p}
    assert left == {fresh.rsplit("/", 1)[-1], other.rsplit("/", 1)[-1]}
    assert _read(fs, "models/kept") == {"a.txt": "a.txt:v1", "_COMPLETE": "a.txt"}


def test_s3_server_stopped_mid_upload_then_rerun(tmp_path, monkeypatch) -> None:
    """The local S3 server goes away in the middle of an upload: one clear error, the old result intact, and once
    the server is back a rerun completes with the same content as an uninterrupted write."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from prunecomp.models.storage import write_dir

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    try:
        fs.mkdir("faults")
        write_dir("s3://faults/run", _fill("v1", ("a.txt", "b.txt")))
        real = fs.put_file
        stopped = []

        def stop_after_first(lpath, rpath, *args, **kwargs):
            out = real(lpath, rpath, *args, **kwargs)
            if not stopped:
                server.stop()
                stopped.append(True)
            return out

        monkeypatch.setattr(fs, "put_file", stop_after_first)
        with pytest.raises(PrunecompError, match="failed"):
            write_dir("s3://faults/run", _fill("v2", ("a.txt", "b.txt", "c.txt")), overwrite=True)
        assert stopped
        monkeypatch.setattr(fs, "put_file", real)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)  # back, with its data (moto keeps state)
        server.start()
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        assert {k: v for k, v in _read(fs, "faults/run").items()} == {"a.txt": "a.txt:v1", "b.txt": "b.txt:v1",
                                                                       "_COMPLETE": "a.txt,b.txt"}
        write_dir("s3://faults/run", _fill("v2", ("a.txt", "b.txt", "c.txt")), overwrite=True)
        fs.invalidate_cache()
        assert _read(fs, "faults/run") == {"a.txt": "a.txt:v2", "b.txt": "b.txt:v2", "c.txt": "c.txt:v2",
                                           "_COMPLETE": "a.txt,b.txt,c.txt"}
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


# Outputs replace only what prunecomp wrote, on S3 exactly as on disk (see test_output_safety.py).


def _s3_tree(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p: fs.cat(p) for p in fs.find(prefix)}


def test_s3_parent_of_source_with_overwrite_is_refused(s3, stories_dir) -> None:
    fs = s3
    for f in stories_dir.iterdir():
        if f.is_file():
            fs.put_file(str(f), f"models/safety/m/base/{f.name}")
    fs.pipe("models/safety/m/notes.txt", b"mine")
    before = _s3_tree(fs, "models/safety/m")
    from click.testing import CliRunner

    from prunecomp.cli import main
    from tests.integration.test_output_safety import FAST

    result = CliRunner().invoke(main, ["prune", "--model", "s3://models/safety/m/base", *FAST, "--out",
                                       "s3://models/safety/m", "--overwrite"], catch_exceptions=False)
    code, text = result.exit_code, result.output
    assert code == 2 and "contains the source model" in text
    assert _s3_tree(fs, "models/safety/m") == before


def test_s3_non_empty_prefix_is_refused_exactly_as_on_disk(s3) -> None:
    fs = s3
    fs.pipe("models/safety/busy/keep.bin", b"precious")
    with pytest.raises(PrunecompError, match="already exists and is not empty; pass --overwrite"):
        check_output("s3://models/safety/busy")
    with pytest.raises(PrunecompError, match="prunecomp did not write"):
        check_output("s3://models/safety/busy", overwrite=True)
    with pytest.raises(PrunecompError, match="prunecomp did not write"):
        write_dir("s3://models/safety/busy", _fill("v1", ("a.txt",)), overwrite=True)
    assert _s3_tree(fs, "models/safety/busy") == {"models/safety/busy/keep.bin": b"precious"}
    write_dir("s3://models/safety/ours", _fill("v1", ("a.txt",)))
    with pytest.raises(PrunecompError, match="already exists"):
        write_dir("s3://models/safety/ours", _fill("v2", ("a.txt",)))
    write_dir("s3://models/safety/ours", _fill("v2", ("c.txt",)), overwrite=True)
    assert set(_s3_tree(fs, "models/safety/ours")) == {"models/safety/ours/c.txt", f"models/safety/ours/{MARKER}"}


def test_s3_swap_that_died_midway_is_still_prunecomp_s(s3) -> None:
    """A replacement that died after removing the old marker leaves ``_WRITING``: the folder is still prunecomp's
    (``--overwrite`` may finish the job) but never reads as a complete result."""
    import fsspec

    fs = fsspec.core.url_to_fs("s3://models/safety/half")[0]  # the instance write_dir uses
    write_dir("s3://models/safety/half", _fill("v1", ("a.txt",)))
    real = fs.rm
    calls: list[str] = []

    def dies_after_marker(path, *args, **kwargs):
        calls.append(str(path))
        real(path, *args, **kwargs)
        if str(path).endswith(MARKER):
            raise ConnectionError("gone")

    fs.rm = dies_after_marker
    try:
        with pytest.raises(PrunecompError, match="failed midway"):
            write_dir("s3://models/safety/half", _fill("v2", ("b.txt",)), overwrite=True)
    finally:
        del fs.rm
    fs.invalidate_cache()
    assert not is_complete("s3://models/safety/half") and is_prunecomp_result("s3://models/safety/half")
    write_dir("s3://models/safety/half", _fill("v2", ("b.txt",)), overwrite=True)
    assert set(_s3_tree(fs, "models/safety/half")) == {"models/safety/half/b.txt", f"models/safety/half/{MARKER}"}
    for leftover in [p for p in fs.ls("models/safety") if "staging" in p]:
        fs.rm(leftover, recursive=True)


def test_s3_json_output_follows_the_file_rules(s3) -> None:
    fs = s3
    fs.pipe("models/safety/reports/theirs.json", b'{"x": 1}')
    with pytest.raises(PrunecompError, match="already exists"):
        check_file_output("s3://models/safety/reports/theirs.json")
    with pytest.raises(PrunecompError, match="did not write"):
        check_file_output("s3://models/safety/reports/theirs.json", overwrite=True)
