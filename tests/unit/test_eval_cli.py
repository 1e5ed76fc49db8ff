"""``prunecomp eval`` on the real small model (stories260K, 5-item subsets) and the result cache behind it.

What is proved: the dense reference comes from a checkpoint's ``prunecomp_report.json``; dense results are computed
once and reused, without even loading the dense model, by a second run and by another pruned variant; only tasks not
yet cached are evaluated; bad input (``--limit 0``, an unknown task, a corrupt or missing data file, a changed
recorded reference) is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model

from prunecomp.cli import main
from prunecomp.errors import PrunecompError
from prunecomp.evaluation import compare, harness
from prunecomp.evaluation.cache import ResultCache, cached_qa, weights_digest
from prunecomp.models.pruning import remove_layer
from prunecomp.models.sources import load_model
from prunecomp.recipes.checkpoint import REPORT_FILE, save_pruned


@pytest.fixture(scope="module")
def variants(tmp_path_factory, stories_dir) -> dict[str, Any]:
    """Two pruned variants of stories260K (layer 2 or layer 3 removed), saved as prunecomp checkpoints."""
    root = tmp_path_factory.mktemp("variants")
    out: dict[str, Any] = {}
    for layer in (2, 3):
        lm = load_model(str(stories_dir))
        out["dense_hash"] = lm.content_hash
        remove_layer(lm.model, layer)
        out[layer] = Path(save_pruned(lm.model, lm.tokenizer, str(root / f"minus{layer}"),
                                      report={"source": lm.provenance(), "steps": []}))
    return out


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PRUNECOMP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def counted(monkeypatch) -> dict[str, list[Any]]:
    """Record every lm-eval QA evaluation (tasks, depth of the model) and every model load of the eval command."""
    calls: dict[str, list[Any]] = {"qa": [], "load": []}
    real_qa, real_load = harness.evaluate_qa, compare.load_model

    def evaluate_qa(model, tokenizer, tasks, **kw):
        calls["qa"].append((list(tasks), model.config.num_hidden_layers))
        return real_qa(model, tokenizer, tasks, **kw)

    def load(uri, *args, **kw):
        calls["load"].append(uri)
        return real_load(uri, *args, **kw)

    monkeypatch.setattr(harness, "evaluate_qa", evaluate_qa)
    monkeypatch.setattr(compare, "load_model", load)
    return calls


def _eval(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["eval", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_dense_from_report_is_computed_once_and_reused(variants, data_dir, tmp_path, counted) -> None:
    js = tmp_path / "eval.json"
    common = ["--tasks", "piqa,copa", "--limit", "5", "--data-dir", str(data_dir)]
    code, text = _eval("--model", str(variants[2]), *common, "--json", str(js))
    assert code == 0, text
    assert counted["qa"] == [(["piqa", "copa"], 4), (["piqa", "copa"], 5)]  # pruned, then dense
    first = json.loads(js.read_text())
    assert first["dense"]["origin"].endswith(REPORT_FILE) and first["dense"]["content_hash"] == variants["dense_hash"]
    assert first["subset"] is True and first["limit"] == 5
    for who in ("model", "dense"):
        assert {t: r["n"] for t, r in first[who]["qa"]["tasks"].items()} == {"piqa": 5, "copa": 5}
    assert set(first["retained"]["qa"]["tasks"]) == {"piqa", "copa"}
    for needle in ("retained %", "5 of 1838", "5 of 100", "average", "SUBSET: --limit 5", "acc_norm (piqa)"):
        assert needle in text, needle

    # Same command again: nothing evaluated, no model even loaded, same numbers.
    n_loads = len(counted["load"])
    code, text = _eval("--model", str(variants[2]), *common, "--json", str(js), "--overwrite")
    assert code == 0, text
    assert len(counted["qa"]) == 2 and len(counted["load"]) == n_loads
    again = json.loads(js.read_text())
    assert again["dense"]["qa"] == first["dense"]["qa"] and again["model"]["qa"] == first["model"]["qa"]
    assert again["dense"]["cached"] == ["piqa", "copa"] and "reused from the cache" in text

    # Another pruned variant of the same dense model: only the variant is evaluated; the dense model is not loaded.
    code, text = _eval("--model", str(variants[3]), *common)
    assert code == 0, text
    assert counted["qa"][2:] == [(["piqa", "copa"], 4)]
    assert counted["load"][n_loads:] == [str(variants[3])]

    # One more task: only that task is computed, for each model.
    code, text = _eval("--model", str(variants[2]), "--tasks", "piqa,copa,arc_easy", *common[2:])
    assert code == 0, text
    assert counted["qa"][3:] == [(["arc_easy"], 4), (["arc_easy"], 5)]


def test_cached_qa_does_not_recompute(tmp_path, monkeypatch) -> None:
    """The cache alone, with a stand-in for lm-eval: a second call neither loads the model nor evaluates."""
    calls: list[list[str]] = []
    loads: list[int] = []

    def fake_qa(model, tokenizer, tasks, **kw):
        calls.append(list(tasks))
        return {"tasks": {t: {"acc": 0.5, "acc_norm": 0.25, "n": 3, "n_total": 9, "metric": "acc", "score": 0.5}
                          for t in tasks}}

    def load():
        loads.append(1)
        return object(), object()

    monkeypatch.setattr(harness, "evaluate_qa", fake_qa)
    cache = ResultCache(tmp_path / "c")
    kw: dict[str, Any] = {"data_dir": None, "limit": 3, "seed": 1, "dtype": "float32", "cache": cache}
    first = cached_qa("hash-a", load, ["copa", "boolq"], **kw)
    second = cached_qa("hash-a", load, ["copa", "boolq"], **kw)
    assert calls == [["copa", "boolq"]] and loads == [1]
    assert second.result == first.result and second.hits == ["copa", "boolq"] and second.computed == []
    assert first.result["average"] == 0.5 and first.result["limit"] == 3 and first.result["data"] == "hub"
    cached_qa("hash-a", load, ["copa"], **(kw | {"seed": 2}))  # another subset is another entry
    cached_qa("hash-b", load, ["copa"], **kw)  # another model too
    cached_qa("hash-a", load, ["copa"], **kw, refresh=True)  # --no-cache recomputes
    assert calls[1:] == [["copa"], ["copa"], ["copa"]]
    for entry in cache.root.glob("*.json"):
        entry.write_text("{broken")  # an unreadable entry is a miss, never an error
    assert cached_qa("hash-a", load, ["copa"], **kw).computed == ["copa"]


@pytest.mark.parametrize(("args", "message"), [
    (["--limit", "0"], "--limit must be a positive number"),
    (["--tasks", "piqa,nonsense"], "unknown task(s) 'nonsense'; known tasks: piqa"),
    (["--tasks", ""], "nothing to evaluate"),
    (["--dense-model", "x", "--no-dense"], "contradict"),
])
def test_bad_options_fail_before_loading(args: list[str], message: str) -> None:
    code, text = _eval("--model", "/does/not/exist", *args)
    assert code == 2 and "error:" in text and message in text and "Traceback" not in text


def test_data_errors_are_one_line(stories_dir, tmp_path) -> None:
    bad = tmp_path / "data" / "copa" / "copa.llmfoundry.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json\n")
    js = tmp_path / "never.json"
    code, text = _eval("--model", str(stories_dir), "--tasks", "copa", "--data-dir", str(tmp_path / "data"),
                       "--json", str(js))
    assert code == 2 and f"error: {bad}: line 1 is not valid JSON" in text and "choices: [str, str]" in text
    assert not js.exists()
    code, text = _eval("--model", str(stories_dir), "--tasks", "piqa", "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "valid.jsonl: data file not found" in text
    code, text = _eval("--model", str(stories_dir), "--tasks", "piqa", "--data-dir", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in text


def test_changed_recorded_reference_is_refused(variants, data_dir, tmp_path) -> None:
    ckpt = Path(shutil.copytree(variants[2], tmp_path / "ckpt"))
    report = json.loads((ckpt / REPORT_FILE).read_text())
    report["source"]["content_hash"] = "0" * 64
    (ckpt / REPORT_FILE).write_text(json.dumps(report))
    code, text = _eval("--model", str(ckpt), "--tasks", "copa", "--limit", "5", "--data-dir", str(data_dir))
    assert code == 2 and "its files changed" in text and "--dense-model" in text
    code, text = _eval("--model", str(ckpt), "--tasks", "copa", "--limit", "5", "--data-dir", str(data_dir),
                       "--no-dense")
    assert code == 0 and "no dense reference" in text and "retained" not in text


def test_mmlu_subset_against_explicit_dense(variants, stories_dir, data_dir, tmp_path) -> None:
    js = tmp_path / "mmlu.json"
    code, text = _eval("--model", str(variants[2]), "--dense-model", str(stories_dir), "--tasks", "", "--mmlu",
                       "--limit", "1", "--data-dir", str(data_dir), "--json", str(js))
    assert code == 0, text
    res = json.loads(js.read_text())
    assert res["model"]["mmlu"]["n"] == res["dense"]["mmlu"]["n"] == 57  # one question per subject
    assert res["dense"]["origin"] == "--dense-model" and res["retained"]["mmlu"]["overall"] is not None
    assert "mmlu (5-shot)" in text and "57 MMLU questions" in text


def test_evaluation_error_is_a_user_error() -> None:
    assert issubclass(harness.EvaluationError, PrunecompError) and issubclass(harness.EvaluationError, ValueError)


def test_weights_digest_names_the_weights_not_the_object() -> None:
    """Equal weights give the same digest (a variant equal to another is evaluated once); any change differs."""
    a = tiny_model("llama")
    b = copy.deepcopy(a)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-3
    assert weights_digest(a) != weights_digest(b)
    remove_layer(a, 1)
    assert weights_digest(a) != weights_digest(copy.deepcopy(b))
