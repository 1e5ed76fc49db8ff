"""Keys that see every input, and cached results that are plain JSON.

An edited data file (same path, new bytes) gives new keys; the device type and the dtype are in every key, and the
tasks load with them; a source that changed after the run hashed it is refused by a later process that loads it;
the results Prefect stores are JSON documents, and a stored record that is not one is recomputed, never read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prunecomp.config import CalibrationConfig, EvalConfig, PruneConfig
from tasks.jobs import (
    CalibrationJob,
    EvalJob,
    FinalJob,
    Job,
    ModelJob,
    RefineJob,
    RefitJob,
    StepJob,
    TeacherJob,
    eval_files,
)
from tasks.keys import check_files

pytestmark = pytest.mark.orchestration

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


def _rewrite(path: Path, text: str) -> None:
    """New bytes and a later mtime, as an editor's save leaves them."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def _calibration(**kw: Any) -> CalibrationJob:
    return CalibrationJob(**({"store": "/s", "model_uri": "/m", "model_hash": "h", "data_dir": None, "code": "v",
                              "calibration": CalibrationConfig(source="tinystories")} | kw))


def test_an_edited_file_gives_new_keys(tmp_path: Path) -> None:
    """Same path, new content: new calibration and evaluation keys; a file that is not read changes nothing."""
    own = tmp_path / "calibration.txt"
    own.write_text("the first calibration text\n")
    cal = CalibrationConfig(source=str(own))
    before = _calibration(calibration=cal)
    assert _calibration(calibration=cal).key == before.key  # hashed once, the same key again
    _rewrite(own, "the second calibration text\n")
    assert _calibration(calibration=cal).key != before.key

    data = tmp_path / "data"
    (data / "ptb").mkdir(parents=True)
    (data / "ptb" / "ptb.valid.txt").write_text("calibration line\n")
    (data / "ptb" / "ptb.test.txt").write_text("evaluation line\n")
    (data / "ptb" / "notes.txt").write_text("not read by anything\n")

    def jobs() -> tuple[str, str]:
        c = _calibration(calibration=CalibrationConfig(source="ptb"), data_dir=str(data))
        e = EvalJob(store="/s", checkpoint_hash="x", evaluation=EvalConfig(datasets=("ptb",)), data_dir=str(data),
                    code="v")
        return c.key, e.key

    cal_key, eval_key = jobs()
    _rewrite(data / "ptb" / "notes.txt", "still not read\n")
    assert jobs() == (cal_key, eval_key)  # the files actually read, not the whole folder
    _rewrite(data / "ptb" / "ptb.test.txt", "another evaluation line\n")
    assert jobs() == (cal_key, jobs()[1]) and jobs()[1] != eval_key
    _rewrite(data / "ptb" / "ptb.valid.txt", "another calibration line\n")
    assert jobs()[0] != cal_key
    # the final check reads the calibration split: an evaluation with it sees that file too
    check = EvalJob(store="/s", checkpoint_hash="x", evaluation=EvalConfig(datasets=()), data_dir=str(data),
                    final_check=CalibrationConfig(source="ptb"), code="v")
    assert [Path(f.path).name for f in check.data_files] == ["ptb.valid.txt"]
    both = EvalJob(store="/s", checkpoint_hash="x", evaluation=EvalConfig(datasets=("ptb",)), data_dir=str(data),
                   final_check=CalibrationConfig(source="ptb"), code="v")
    assert [Path(f.path).name for f in both.data_files] == ["ptb.test.txt", "ptb.valid.txt"]
    check_files(both.data_files, eval_files(both.evaluation, both.data_dir, (), both.final_check))
    twice = EvalJob(store="/s", checkpoint_hash="x", evaluation=EvalConfig(datasets=("ptb",)), data_dir=str(data),
                   final_check=CalibrationConfig(source=str(data / "ptb" / "ptb.test.txt")), code="v")
    assert len(twice.data_files) == 1  # one file read twice is one file
    check_files(twice.data_files, eval_files(twice.evaluation, twice.data_dir, (), twice.final_check))
    # where a copy lies on disk and when it was written are not in the key: its bytes are
    moved = check.model_copy(update={"data_files": tuple(f.model_copy(update={"mtime_ns": 1, "size": 1})
                                                         for f in check.data_files)})
    assert moved.key == check.key


def _every_job(**kw: Any) -> list[Job]:
    from tasks.candidates import CandidateJob

    state = {"store": "/s", "base_uri": "/m", "base_hash": "p" * 64, "parts": ("/s/steps/a",),
             "state_digest": "x" * 64, "code": "v"} | kw
    windows = {"calibration_uri": "/s/c", "calibration_digest": "d"}
    return [
        ModelJob(store="/s", source_uri=None, source_hash="h", code="v", **kw),
        _calibration(**kw),
        StepJob(**state, **windows, prune=PruneConfig(n_layers=2), step=0, batch_size=4),
        TeacherJob(store="/s", base_uri="/m", base_hash="p" * 64, **windows, topk=8, batch_size=4, code="v", **kw),
        RefineJob(**state, **windows, teacher_uri="/s/t", mode="channels", steps=8, lr=1e-3, batch=2, topk=8,
                  batch_size=4),
        RefitJob(**state, **windows, steps=8, lr=1e-3, batch=2),
        CandidateJob(**state, **windows, metric="ppl", candidates=(1, 2), batch_size=4),
        FinalJob(**state, source={"content_hash": "p" * 64}),
        EvalJob(store="/s", checkpoint_hash="x", evaluation=EvalConfig(datasets=()), data_dir=None, code="v", **kw),
    ]


def test_device_type_and_dtype_are_in_every_key() -> None:
    from tasks.keys import default_device, default_dtype

    cpu = _every_job(device="cpu", dtype="float32")
    gpu = _every_job(device="cuda", dtype="float32")
    bf16 = _every_job(device="cpu", dtype="bfloat16")
    for a, b, c in zip(cpu, gpu, bf16, strict=True):
        assert len({a.key, b.key, c.key}) == 3, type(a).__name__
        assert a.uri != b.uri  # a GPU run's final model is not a CPU run's
    default = _every_job()
    assert [j.device for j in default] == [default_device()] * len(default)
    assert {j.dtype for j in default} == {default_dtype(default_device())}
    assert _every_job(device="cuda")[2].dtype == "bfloat16"  # the library's compute dtype on CUDA
    assert [j.key for j in default] == [j.key for j in _every_job(device=default_device())]


def test_the_working_copy_is_loaded_in_the_jobs_dtype(stories: Path) -> None:
    import torch

    from prunecomp.recipes.recipe import Recipe
    from tasks import working
    from tasks.model_io import resolve_model

    src = resolve_model.fn(str(stories))
    dense = Recipe(source={"content_hash": src["content_hash"]})
    working.drop()
    with working.checkout(src["load_uri"], dense, device="cpu", dtype="bfloat16") as wc:
        assert next(wc.model.parameters()).dtype == torch.bfloat16
    loads = working.stats()["loads"]
    with working.checkout(src["load_uri"], dense, device="cpu", dtype="float32") as wc:
        assert next(wc.model.parameters()).dtype == torch.float32
    assert working.stats()["loads"] == loads + 1  # another dtype is another copy, not the bf16 one reused
    working.drop()


_LATER_PROCESS = """
import json, sys
from prunecomp.errors import PrunecompError
from prunecomp.recipes.recipe import Recipe
from tasks import working
from tasks.calibrate import build_calibration
from tasks.jobs import CalibrationJob, FinalJob

docs = json.loads(open(sys.argv[1]).read())
out = {}
for name, doc in docs.items():
    job = (FinalJob if name == "state" else CalibrationJob).model_validate(doc)
    try:
        if name == "state":
            working.load_state(job.base_uri, Recipe(source={"content_hash": job.base_hash}), device=job.device,
                               dtype=job.dtype, record=job.source_record)
        else:
            build_calibration.fn(job)
        out[name] = "ok"
    except PrunecompError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


def test_a_source_changed_after_it_was_hashed_is_refused_by_a_later_process(stories: Path, tmp_path: Path) -> None:
    """Jobs built (and their sources hashed) here; the files change; a new process that runs them refuses."""
    from tasks.model_io import resolve_model

    text = (DATA / "tinystories" / "tinystories_val.txt").read_text()[:20000]
    jobs: dict[str, Any] = {}
    models = {}
    for name in ("kept", "edited"):
        shutil.copytree(stories, tmp_path / name, ignore=shutil.ignore_patterns("original"))
        models[name] = resolve_model.fn(str(tmp_path / name))  # hashed, and its files' stamps recorded
    for name, model in (("unchanged", "kept"), ("text", "kept"), ("model", "edited")):
        (tmp_path / f"{name}.txt").write_text(text)
        jobs[name] = CalibrationJob(
            store=str(tmp_path / "store"), model_uri=models[model]["load_uri"],
            model_hash=models[model]["content_hash"], data_dir=None,
            calibration=CalibrationConfig(source=str(tmp_path / f"{name}.txt"), n_samples=2, seq_len=32))
        assert jobs[name].source_record is not None and len(jobs[name].data_files) == 1
    edited = models["edited"]
    jobs["state"] = FinalJob(store=str(tmp_path / "store"), base_uri=edited["load_uri"],
                             base_hash=edited["content_hash"], state_digest="x" * 64,
                             source={"content_hash": edited["content_hash"]})
    (tmp_path / "jobs.json").write_text(json.dumps({k: v.model_dump(mode="json") for k, v in jobs.items()}))

    _rewrite(tmp_path / "text.txt", text.replace("the", "a"))
    config = tmp_path / "edited" / "config.json"
    _rewrite(config, config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))

    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _LATER_PROCESS, str(tmp_path / "jobs.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["unchanged"] == "ok"
    assert "text.txt" in out["text"] and "changed after this run hashed it" in out["text"]
    assert "config.json" in out["model"] and "changed after this run hashed it" in out["model"]
    assert "config.json" in out["state"] and "changed after this run hashed it" in out["state"]


class _Touch:
    """What a pickled result can do when it is read: here, create a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return Path.touch, (self.path,)


def test_cached_results_are_json_and_a_pickled_record_is_never_read(harness: dict[str, str], stories: Path,
                                                                    tmp_path: Path) -> None:
    from prefect import flow
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    from tasks.caching import run_cached
    from tasks.calibrate import build_calibration
    from tasks.model_io import resolve_model

    src = resolve_model.fn(str(stories))
    job = CalibrationJob(store=str(tmp_path / "store"), model_uri=src["load_uri"], model_hash=src["content_hash"],
                         data_dir=str(DATA),
                         calibration=CalibrationConfig(source="tinystories", n_samples=2, seq_len=32))

    @flow(name="calibrate-cached")
    def calibrate(times: int) -> list[tuple[Any, bool]]:
        return [run_cached(build_calibration, job) for _ in range(times)]

    @flow(name="calibrate-directly")
    def directly() -> tuple[Any, bool]:  # as a fanned-out task is called: Prefect's own cache lookup
        state = build_calibration(job=job, return_state=True)
        return state.result(), state.name == "Cached"

    (first, computed), (again, cached) = calibrate(2)
    assert not computed and cached and again == first and first["digest"]
    record = Path(harness["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]) / f"build-calibration-{job.key}"
    raw = record.read_bytes()
    assert not raw.startswith(b"\x80")  # no pickle header
    doc = json.loads(raw)
    assert doc["metadata"]["serializer"]["type"] == "json"
    assert not doc["result"].startswith(("gAS", "gAR"))  # nor base64 of one
    assert json.loads(doc["result"]) == first  # the result is the plain document itself

    # whoever can write to result storage leaves a pickle there: it is recomputed, never unpickled
    marker = tmp_path / "code-ran"
    evil = ResultRecord(metadata=ResultRecordMetadata(storage_key=str(record), serializer=PickleSerializer()),
                        result=_Touch(marker))
    record.write_bytes(evil.serialize())
    result, was_cached = directly()
    assert not marker.exists() and not was_cached and result == first
    [(result, was_cached)] = calibrate(1)
    assert not marker.exists() and not was_cached and result == first
    assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == "json"  # replaced
    assert directly() == (first, True)


def test_an_s3_source_is_checked_by_etag(s3, stories: Path) -> None:
    """A model on S3: its objects' ETags are recorded when it is hashed; a rewritten object is refused by a later
    load, and by this process's next hash (its downloaded copy is the old one)."""
    import s3fs

    from prunecomp.errors import PrunecompError
    from tasks.keys import check_source, recorded_source
    from tasks.model_io import resolve_model

    fs = s3fs.S3FileSystem()
    uri = "s3://prunecomp/sources/stories260K"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        fs.put(str(stories / name), f"{uri.removeprefix('s3://')}/{name}")
    src = resolve_model.fn(uri)
    record = recorded_source(src["load_uri"])
    assert record is not None and record.content_hash == src["content_hash"]
    assert all(stamp.startswith("etag=") and "etag=;" not in stamp for stamp in record.stamps.values())
    check_source(record, src["content_hash"])
    config = (stories / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06')
    fs.pipe(f"{uri.removeprefix('s3://')}/config.json", config.encode())
    with pytest.raises(PrunecompError, match=r"changed after this run hashed it \(config\.json"):
        check_source(record, src["content_hash"])
    with pytest.raises(PrunecompError, match="since this process downloaded it"):
        resolve_model.fn(uri)


def test_every_persisted_task_result_is_plain_json() -> None:
    """Every task of the pipeline that persists its result does so with the plain JSON serializer."""
    import importlib
    import pkgutil

    from prefect import Task

    import tasks
    from tasks.caching import RESULT_SERIALIZER

    found = {}
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        found |= {obj.name: obj for obj in vars(module).values() if isinstance(obj, Task) and obj.persist_result}
    assert {"build-calibration", "prune-step", "evaluate", "write-final", "materialize-model", "teacher", "refine",
            "refit", "score-candidates"} <= set(found)
    assert {name for name, t in found.items() if t.result_serializer is not RESULT_SERIALIZER} == set()
