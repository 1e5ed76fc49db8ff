"""Promotion cannot go wrong quietly: the champion alias moves only to a finished, whole checkpoint that matches
its version; gates always check something; versions evaluated differently are never compared; and two
promotions at once end with the better version as champion.

Registry work runs against the session's sqlite MLflow without Prefect (:func:`tasks.promotion.promote_version` is
Prefect-free); versions are copies of stories260K (1 MB) made loadable MLflow Models once per module.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from prunecomp.config import EvalConfig
from prunecomp.errors import PrunecompError

pytestmark = pytest.mark.orchestration

EVAL = EvalConfig(datasets=("wikitext2", "c4", "ptb"), seq_len=512, max_windows=40)
BEAT = [{"name": "beat_champion", "metric": "ppl_mean_pruned", "vs_champion": True}]
WITHIN = [{"name": "max_ppl_increase", "metric": "ppl_ratio_mean", "threshold": 100.0}]


def _tags(evaluation: EvalConfig = EVAL, **kw: Any) -> dict[str, str]:
    from tasks.tracking import eval_settings_tags

    return eval_settings_tags(evaluation, device=kw.pop("device", "cpu"), dtype=kw.pop("dtype", "float32"), **kw)


@pytest.fixture(scope="module")
def template(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished checkpoint as the compress flow writes it: HF folder + MLflow Model files + report + marker."""
    from tasks.mlflow_model import write_mlflow_model

    folder = tmp_path_factory.mktemp("promotion") / "template"
    shutil.copytree(stories, folder, ignore=shutil.ignore_patterns("original", "PROVENANCE.md"))
    for f in folder.rglob("*"):
        f.chmod(0o644 if f.is_file() else 0o755)
    write_mlflow_model(folder, architecture="LlamaForCausalLM", tokenizer_class="LlamaTokenizer",
                       dtype="torch.float32", source_name=str(stories))
    (folder / "_COMPLETE").write_text("")
    return folder


class Registry:
    """One fresh registered model in the session's MLflow, and versions of it made from the template."""

    def __init__(self, tracking_uri: str, template: Path, tmp: Path) -> None:
        from tasks.tracking import client

        self.uri, self.template, self.tmp = tracking_uri, template, tmp
        self.c = client(tracking_uri)
        self.name = f"safety-{uuid.uuid4().hex[:8]}"
        self.exp = self.c.create_experiment(self.name, artifact_location=f"file://{tmp}/mlruns")
        self.c.create_registered_model(self.name)

    def folder(self, checkpoint_hash: str) -> Path:
        out = self.tmp / checkpoint_hash
        shutil.copytree(self.template, out)
        (out / "prunecomp_report.json").write_text(json.dumps({"pipeline": {"hash": checkpoint_hash}}))
        return out

    def add(self, metrics: dict[str, float], *, folder: Path | None = None, tags: dict[str, str] | None = None,
            checkpoint_hash: str | None = None) -> str:
        """Register a version whose run logged ``metrics``; returns its number."""
        checkpoint_hash = checkpoint_hash or uuid.uuid4().hex
        folder = folder or self.folder(checkpoint_hash)
        run = self.c.create_run(self.exp)
        for key, value in metrics.items():
            self.c.log_metric(run.info.run_id, key, value)
        mv = self.c.create_model_version(self.name, source=str(folder), run_id=run.info.run_id,
                                         tags={"checkpoint_hash": checkpoint_hash, **(_tags() if tags is None
                                                                                      else tags)})
        return str(mv.version)

    def promote(self, version: str, gates: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        from tasks.promotion import promote_version

        return promote_version(tracking_uri=self.uri, name=self.name, version=version, gates=gates, **kw)

    def champion(self) -> str | None:
        from tasks.promotion import _alias_version

        return _alias_version(self.c, self.name, "champion")


@pytest.fixture
def registry(tracking_uri: str, template: Path, tmp_path: Path) -> Registry:
    return Registry(tracking_uri, template, tmp_path)


# -- only a finished, whole checkpoint that matches its version ------------------------------------------------

def _truncate_to_16(folder: Path) -> None:
    with (folder / "model.safetensors").open("r+b") as fh:
        fh.truncate(16)


def _drop_last_byte(folder: Path) -> None:
    path = folder / "model.safetensors"
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 1)


def _append(folder: Path) -> None:
    with (folder / "model.safetensors").open("ab") as fh:
        fh.write(b"\0" * 8)


def _unfinished(folder: Path) -> None:
    (folder / "_COMPLETE").unlink()


@pytest.mark.parametrize(("damage", "reason"), [
    (_truncate_to_16, "truncated"), (_drop_last_byte, "truncated"), (_append, "longer than its header"),
    (_unfinished, "_COMPLETE"),
], ids=["truncated-to-16-bytes", "one-byte-short", "bytes-appended", "no-marker"])
def test_a_damaged_or_unfinished_checkpoint_is_never_promoted(registry: Registry, damage: Any,
                                                              reason: str) -> None:
    folder = registry.folder("damaged")
    damage(folder)
    version = registry.add({"ppl_ratio_mean": 1.5}, folder=folder, checkpoint_hash="damaged")
    with pytest.raises(PrunecompError, match=f"not a loadable MLflow Model.*{reason}") as info:
        registry.promote(version, WITHIN)
    assert "run the compress run that registered it again" in str(info.value)
    assert registry.champion() is None


def test_a_checkpoint_that_is_another_model_is_never_promoted(registry: Registry) -> None:
    """The report beside the weights must name the hash the version was registered for."""
    folder = registry.folder("the-files-model")
    version = registry.add({"ppl_ratio_mean": 1.5}, folder=folder, checkpoint_hash="the-registered-model")
    with pytest.raises(PrunecompError, match="another model"):
        registry.promote(version, WITHIN)
    untagged = registry.c.create_model_version(registry.name, source=str(registry.folder("x")), tags=_tags())
    with pytest.raises(PrunecompError, match="no checkpoint_hash tag"):
        registry.promote(str(untagged.version), WITHIN)
    assert registry.champion() is None


def test_a_whole_checkpoint_is_promoted_and_sharded_weights_are_checked_shard_by_shard(
        registry: Registry, tmp_path: Path) -> None:
    from tasks.mlflow_model import check_version_files

    version = registry.add({"ppl_ratio_mean": 1.5}, checkpoint_hash="whole")
    assert registry.promote(version, WITHIN)["changed"] and registry.champion() == version
    # a sharded checkpoint: an index naming two shards; one truncated shard refuses the whole version
    from safetensors.torch import load_file, save_file

    folder = registry.folder("sharded")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, folder / file)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    assert check_version_files(str(folder), "sharded") is None
    with (folder / "model-00002-of-00002.safetensors").open("r+b") as fh:
        fh.truncate(100)
    assert "model-00002-of-00002.safetensors is truncated" in (check_version_files(str(folder), "sharded") or "")


def test_the_file_check_reads_s3_headers_only(s3: dict[str, str], template: Path) -> None:
    """The same check on an object store: marker, MLflow files, safetensors header and size, report hash."""
    import s3fs

    from tasks.mlflow_model import check_version_files
    from tasks.settings import configure_s3

    configure_s3()
    fs = s3fs.S3FileSystem()
    root = f"prunecomp/promotion-{uuid.uuid4().hex[:8]}"
    fs.put(str(template), root, recursive=True)
    fs.pipe(f"{root}/prunecomp_report.json", json.dumps({"pipeline": {"hash": "on-s3"}}).encode())
    assert check_version_files(f"s3://{root}", "on-s3") is None
    assert "another model" in (check_version_files(f"s3://{root}", "other") or "")
    fs.pipe(f"{root}/model.safetensors", fs.cat(f"{root}/model.safetensors")[:16])
    assert "truncated" in (check_version_files(f"s3://{root}", "on-s3") or "")
    fs.rm(f"{root}/_COMPLETE")
    assert "_COMPLETE" in (check_version_files(f"s3://{root}", "on-s3") or "")


# -- gates that always check something ---------------------------------------------------------------------------

def test_gates_that_check_nothing_are_refused(registry: Registry) -> None:
    from flows.params import PromoteConfig
    from tasks.gates import MetricGate

    with pytest.raises(ValidationError, match="at least one gate is needed"):
        PromoteConfig(registered_model="x", gates=[])
    for typo in ("ppl_mean_prunned", "fold_los_ratio", "qa_retain"):
        with pytest.raises(ValidationError, match="unknown metric"):
            PromoteConfig(registered_model="x", gates=[{"name": "g", "metric": typo, "threshold": 1.0,
                                                        "missing": "skip"}])
    with pytest.raises(ValidationError, match="finite"):
        MetricGate(name="g", metric="ppl_ratio_mean", threshold=math.nan)
    version = registry.add({"ppl_ratio_mean": 1.5})
    with pytest.raises(PrunecompError, match="no promotion gates"):
        registry.promote(version, [])
    with pytest.raises(PrunecompError, match="unknown metric 'ppl_mean_prunned'"):
        registry.promote(version, [{"name": "g", "metric": "ppl_mean_prunned", "vs_champion": True,
                                    "missing": "skip"}])
    assert registry.champion() is None


def test_a_nan_metric_fails_its_gate_even_when_missing_is_skip(registry: Registry) -> None:
    from tasks.gates import GateFailed

    folds = [{"name": "folds_not_worse", "metric": "fold_loss_ratio", "threshold": 1.0001, "missing": "skip"}]
    version = registry.add({"ppl_ratio_mean": 1.5, "fold_loss_ratio": math.nan})
    with pytest.raises(GateFailed, match="folds_not_worse: fold_loss_ratio is nan") as info:
        registry.promote(version, folds)
    assert info.value.decision.failed == ["folds_not_worse"] and registry.champion() is None
    measured = registry.add({"ppl_ratio_mean": 1.5})  # not measured at all: skipped, as declared
    assert registry.promote(measured, folds)["changed"]


def test_every_metric_the_compress_flow_logs_is_a_known_gate_metric() -> None:
    from flows.registration import run_metrics
    from tasks.gates import is_known_metric

    metrics = run_metrics({"wikitext2": {"dense": 10.0, "pruned": 12.0}, "tinystories": {"dense": 3.0, "pruned": 4.0}},
                          {"dense": 0.6, "pruned": 0.5}, 2, {"loss": 1.0, "uncompensated_loss": 1.1})
    metrics |= {"refit_error_before": 0.1, "refit_error_after": 0.05, "refit_seconds": 1.0}  # see flows.compress
    assert [m for m in metrics if not is_known_metric(m)] == []
    assert not any(is_known_metric(m) for m in ("ppl_mean", "qa_retained_x", "ppl_wikitext2_prunned", "loss"))


# -- no comparison across different evaluation settings --------------------------------------------------------

def test_eval_settings_digest_follows_what_changes_the_numbers() -> None:
    from tasks.tracking import EVAL_DIGEST_TAG, EVAL_SETTINGS_TAG

    base = _tags()[EVAL_DIGEST_TAG]
    assert _tags(EVAL.model_copy(update={"batch_size": 8}))[EVAL_DIGEST_TAG] == base  # no effect on results
    assert _tags(EVAL.model_copy(update={"datasets": ("ptb", "c4", "wikitext2")}))[EVAL_DIGEST_TAG] == base
    others = [_tags(EVAL.model_copy(update={"datasets": ("wikitext2",)})), _tags(EVAL.model_copy(
        update={"max_windows": 8})), _tags(EVAL.model_copy(update={"seq_len": 2048})), _tags(dtype="bfloat16"),
        _tags(device="cuda"), _tags(qa_tasks=("piqa",))]
    assert len({t[EVAL_DIGEST_TAG] for t in others} | {base}) == len(others) + 1
    assert _tags()[EVAL_SETTINGS_TAG] == "ppl c4,ptb,wikitext2 seq_len 512 windows 40; qa -; float32 on cpu"


def test_track_tags_every_version_with_its_eval_settings(make_config, tmp_path: Path, monkeypatch) -> None:
    """What ``flows.registration.track_run`` sends to MLflow: the run's and the version's tags carry the digest."""
    import flows.registration as compress_flow
    from tasks.settings import locations
    from tasks.tracking import EVAL_DIGEST_TAG, eval_settings_tags

    seen: dict[str, Any] = {}
    monkeypatch.setattr(compress_flow, "log_run_task", lambda **kw: seen.update(run=kw["tags"]) or
                        {"run_id": "r", "model_id": "", "model_uri": "u"})
    monkeypatch.setattr(compress_flow, "register_task", lambda **kw: seen.update(version=kw["tags"]) or
                        {"name": kw["name"], "version": "1"})
    monkeypatch.setattr(compress_flow, "summary_markdown", lambda summary: "")
    cfg = make_config(str(tmp_path), "sqlite:///unused.db")
    summary = {"final_check": None, "steps": [], "removed": [2], "source": {"uri": "m", "content_hash": "h"},
               "calibration": {"digest": "d", "origin": "o"}, "code_version": "c", "final": {"uri": "f", "hash": "x"},
               "run_id": "run", "config": cfg.model_dump(mode="json")}
    out = compress_flow.track_run(cfg, locations(str(tmp_path), "sqlite:///unused.db"), summary, {}, final_uri="f")
    expected = eval_settings_tags(cfg.evaluation, cfg.qa_tasks, cfg.qa_limit)
    assert seen["run"][EVAL_DIGEST_TAG] == seen["version"][EVAL_DIGEST_TAG] == expected[EVAL_DIGEST_TAG]
    assert out["name"] == "prunecomp-stories260k-adhoc"  # an ad-hoc run never adds to a deployment's model


def test_vs_champion_refuses_versions_evaluated_differently(registry: Registry) -> None:
    from tasks.gates import GateFailed

    champion = registry.add({"ppl_mean_pruned": 30.0, "ppl_ratio_mean": 1.5})
    assert registry.promote(champion, BEAT + WITHIN)["changed"]
    fewer_windows = registry.add({"ppl_mean_pruned": 20.0, "ppl_ratio_mean": 1.4},
                                 tags=_tags(EVAL.model_copy(update={"max_windows": 4})))
    with pytest.raises(GateFailed, match="evaluated differently from champion version") as info:
        registry.promote(fewer_windows, BEAT + WITHIN)
    assert info.value.decision.failed == ["beat_champion"]
    assert "windows 4" in str(info.value) and "windows 40" in str(info.value)
    assert "without vs_champion gates" in str(info.value)  # and what to do instead
    unknown = registry.add({"ppl_mean_pruned": 20.0, "ppl_ratio_mean": 1.4}, tags={})
    with pytest.raises(GateFailed, match="this version has unknown evaluation settings"):
        registry.promote(unknown, BEAT)
    assert registry.champion() == champion
    assert registry.promote(unknown, WITHIN)["changed"]  # deliberately, without comparing: a champion of old
    tagged = registry.add({"ppl_mean_pruned": 10.0, "ppl_ratio_mean": 1.1})
    with pytest.raises(GateFailed, match=r"champion version \d+ has unknown evaluation settings"):
        registry.promote(tagged, BEAT)
    assert registry.champion() == unknown


def test_same_settings_compare_as_before(registry: Registry) -> None:
    from tasks.gates import GateFailed

    v1 = registry.add({"ppl_mean_pruned": 30.0})
    v2 = registry.add({"ppl_mean_pruned": 31.0})
    v3 = registry.add({"ppl_mean_pruned": 29.0})
    assert registry.promote(v1, BEAT)["changed"]
    with pytest.raises(GateFailed, match="ppl_mean_pruned 31 vs champion 30"):
        registry.promote(v2, BEAT)
    result = registry.promote(v3, BEAT)
    assert result["changed"] and result["previous"] == v1 and registry.champion() == v3
    assert not registry.promote(v3, BEAT)["changed"]


# -- concurrent promotions -----------------------------------------------------------------------------------------

def test_two_concurrent_promotions_end_with_the_better_version_as_champion(registry: Registry,
                                                                           monkeypatch) -> None:
    """v1 is champion; v2 (better) and v3 (better than v1, worse than v2) are promoted at the same moment from two
    threads. The worse one is slowed down between reading the champion and moving the alias, the window in which
    an unserialized promotion would overwrite the better one."""
    import tasks.promotion
    from tasks.gates import GateFailed

    v1 = registry.add({"ppl_mean_pruned": 30.0})
    v2 = registry.add({"ppl_mean_pruned": 20.0})
    v3 = registry.add({"ppl_mean_pruned": 25.0})
    assert registry.promote(v1, BEAT)["changed"]
    real = tasks.promotion.decide

    def slow_for_the_worse(*args: Any, **kw: Any) -> Any:
        if args[1].get("ppl_mean_pruned") == 25.0:
            time.sleep(1.5)
        return real(*args, **kw)

    monkeypatch.setattr(tasks.promotion, "decide", slow_for_the_worse)
    start = threading.Barrier(2)
    outcome: dict[str, Any] = {}

    def promote(version: str) -> None:
        start.wait()
        try:
            outcome[version] = registry.promote(version, BEAT, lock_wait_s=60)["changed"]
        except GateFailed as exc:
            outcome[version] = exc
        except Exception as exc:  # anything else is a failure of the test, reported below
            outcome[version] = repr(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (v3, v2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert outcome.get(v2) is True, outcome
    assert outcome.get(v3) is True or isinstance(outcome.get(v3), GateFailed), outcome
    assert registry.champion() == v2
    from tasks.promotion import LOCK_SUFFIX

    assert not registry.c.search_registered_models(f"name = '{registry.name}{LOCK_SUFFIX}'")  # lock released


def test_a_dead_promoters_lock_is_taken_over_and_a_live_one_is_waited_for(registry: Registry) -> None:
    from tasks.promotion import LOCK_SUFFIX, promotion_lock

    lock = f"{registry.name}{LOCK_SUFFIX}"
    dead = {"token": "t", "host": socket.gethostname(), "pid": 2**22 + 12345, "since": time.time()}
    registry.c.create_registered_model(lock, tags={"prunecomp.promotion_lock": json.dumps(dead)})
    with promotion_lock(registry.c, registry.name, wait_s=5), \
            pytest.raises(PrunecompError, match=r"another promotion .* is in progress"), \
            promotion_lock(registry.c, registry.name, wait_s=0.3):
        pass
    version = registry.add({"ppl_mean_pruned": 30.0})
    assert registry.promote(version, BEAT, lock_wait_s=5)["changed"]
