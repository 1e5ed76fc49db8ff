"""Model sources: hub ids with revisions (hub mocked: no network here), GGUF files, opt-ins."""

from __future__ import annotations

import json
import shutil

import pytest

from prunecomp.errors import PrunecompError
from prunecomp.models.sources import load_model, resolve_source

pytestmark = pytest.mark.integration


def test_hub_id_with_revision_downloads_safetensors_only(monkeypatch, stories_dir) -> None:
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(stories_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    lm = load_model("karpathy/stories260K", revision="abc123")
    assert lm.source.kind == "hub" and lm.provenance()["revision"] == "abc123"
    assert calls[0][:2] == ("karpathy/stories260K", "abc123")
    assert "*.safetensors" in calls[0][2] and "*.bin" not in calls[0][2]
    assert lm.content_hash == load_model(str(stories_dir)).content_hash


def test_hub_failure_is_one_clear_error(monkeypatch) -> None:
    def offline(*_a, **_k):
        raise OSError("offline")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(PrunecompError, match="not a local path, and downloading it from the Hugging Face hub"):
        resolve_source("org/model")
    with pytest.raises(PrunecompError, match="neither an existing path"):
        resolve_source("justaname")


def test_remote_code_needs_opt_in(tmp_path, stories_dir) -> None:
    d = tmp_path / "custom"
    shutil.copytree(stories_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PrunecompError, match="--trust-remote-code"):
        load_model(str(d))


def test_pickle_opt_in_is_honoured(tmp_path, stories_dir) -> None:
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_dir / name, d / name)
    torch.save(load_file(stories_dir / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(PrunecompError, match="pickle"):
        load_model(str(d))
    lm = load_model(str(d), allow_pickle=True)
    assert lm.model.config.num_hidden_layers == 5 and lm.source.weight_files == ("pytorch_model.bin",)
