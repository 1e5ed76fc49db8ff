"""Registered versions as MLflow users use them: load by alias with the transformers and pyfunc flavors, serve
with ``mlflow models serve``, and a champion alias that only moves to loadable versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from prunecomp.errors import PrunecompError


@pytest.fixture(scope="module")
def registered(harness, tracking_uri, make_config, tmp_path_factory) -> dict:
    from flows.compress import compress

    store = tmp_path_factory.mktemp("models-store")
    cfg = make_config(str(store), tracking_uri, tracking={"registered_model": "stories-models"})
    return compress(config=cfg)


def _use_registry(tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def test_registered_version_loads_through_both_flavors(registered, tracking_uri, monkeypatch) -> None:
    import mlflow
    from transformers import AutoModelForCausalLM

    from tasks.tracking import client

    _use_registry(tracking_uri, monkeypatch)
    final = Path(registered["final"]["uri"])
    assert (final / "MLmodel").is_file() and (final / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 3  # still a plain HF folder
    assert list(final.rglob("*.safetensors")) == [final / "model.safetensors"]  # one copy of the weights
    pipe = mlflow.transformers.load_model("models:/stories-models@candidate")
    text = pipe("Once upon a time", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    model = mlflow.pyfunc.load_model("models:/stories-models@candidate")
    out = model.predict(["Once upon a time"], params={"max_new_tokens": 8})
    assert isinstance(out[0], str) and out[0]
    info = mlflow.models.get_model_info("models:/stories-models@candidate")
    assert info.signature is not None and {"transformers", "python_function"} <= set(info.flavors)
    reqs = (final / "requirements.txt").read_text()
    assert "mlflow==" in reqs and "transformers==" in reqs and "torch==" in reqs
    # MLflow 3's model-centric API: the logged model carries the run's metrics and names the version
    c = client(tracking_uri)
    logged = c.get_logged_model(registered["mlflow"]["model_id"])
    assert {m.key for m in logged.metrics} >= {"ppl_ratio_mean", "fold_loss_ratio"}
    assert logged.tags["registered.stories-models"] == registered["mlflow"]["version"]


def test_mlflow_models_serve_answers_on_localhost(registered, tracking_uri, port_factory, monkeypatch) -> None:
    from flows.params import PromoteConfig
    from flows.promote import promote

    _use_registry(tracking_uri, monkeypatch)
    promote(config=PromoteConfig(registered_model="stories-models", tracking_uri=tracking_uri,
                                 gates=[{"name": "max_ppl_increase", "metric": "ppl_ratio_mean", "threshold": 100.0}]))
    port = port_factory()
    bin_dir = Path(sys.executable).parent  # mlflow runs `uvicorn` from PATH, as in an activated venv
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri,
                        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_bin = bin_dir / "mlflow"
    proc = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m", "models:/stories-models@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"mlflow models serve did not come up (rc {proc.poll()}):\n{out[-3000:]}")
            time.sleep(1)
        body = json.dumps({"inputs": ["Once upon a time"], "params": {"max_new_tokens": 8}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert isinstance(answer["predictions"][0], str) and answer["predictions"][0]
    finally:
        import contextlib
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_champion_never_moves_to_a_version_that_does_not_load(registered, tracking_uri, stories) -> None:
    from tasks.promotion import promote_version
    from tasks.tracking import client

    c = client(tracking_uri)
    before = str(c.get_model_version_by_alias("stories-models", "candidate").version)
    plain = c.create_model_version("stories-models", source=str(stories), run_id=registered["mlflow"]["run_id"],
                                   tags={"checkpoint_hash": "plain-folder"})
    with pytest.raises(PrunecompError, match="not a loadable MLflow Model"):
        promote_version(tracking_uri=tracking_uri, name="stories-models", version=str(plain.version),
                        gates=[{"name": "max_ppl_increase", "metric": "ppl_ratio_mean", "threshold": 100.0}])
    try:
        champion = str(c.get_model_version_by_alias("stories-models", "champion").version)
    except Exception:
        champion = None
    assert champion != str(plain.version) and before
