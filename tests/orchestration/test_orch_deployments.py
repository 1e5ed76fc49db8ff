"""Every shipped deployment and config file loads and validates against the flows' parameter models, with
Prefect's own parameter check too; deployment parameters match the config file they are a copy of."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.params import CompressConfig, PromoteConfig

pytestmark = pytest.mark.orchestration

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
MODELS = {"compress": CompressConfig, "promote": PromoteConfig}


def _flow(entrypoint: str) -> Any:
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def _config_files() -> list[Path]:
    return sorted((DEPLOYMENTS / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.name)
def test_config_file_validates(path: Path) -> None:
    kind = path.name.split("-", 1)[0]
    assert kind in MODELS, f"{path.name}: config files are named compress-*.yaml or promote-*.yaml"
    MODELS[kind].model_validate(yaml.safe_load(path.read_text()))


def test_prefect_yaml_deployments_validate() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    spec = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert len(names) == len(set(names))
    crons = 0
    for dep in spec["deployments"]:
        flow = _flow(dep["entrypoint"])
        assert (DEPLOYMENTS.parent / dep["entrypoint"].split(":")[0]).is_file()
        params = flow.validate_parameters(dep["parameters"])  # Prefect's own schema check
        model = MODELS[flow.name]
        assert isinstance(params["config"], model)
        tag = next(t for t in dep["tags"] if t.startswith("config:")).removeprefix("config:")
        from_file = yaml.safe_load((DEPLOYMENTS / "configs" / f"{tag}.yaml").read_text())
        assert model.model_validate(from_file) == params["config"], f"{dep['name']} drifted from configs/{tag}.yaml"
        assert dep["work_pool"]["name"]
        for schedule in dep.get("schedules") or []:
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
            crons += flow.name == "compress"
    assert crons >= 1, "a scheduled compression deployment is shipped"
    assert any(_flow(d["entrypoint"]).name == "promote" and not d.get("schedules") for d in spec["deployments"])


def test_bad_deployment_parameters_are_rejected() -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.compress import compress

    with pytest.raises(ParameterTypeError):
        compress.validate_parameters({"config": {"prune": {"n_layers": 2, "metric": "bogus"}}})
