"""The CLI is generated from the configuration: every field has exactly one option in prune and in run, with the
field's choices and description, grouped by stage in --help."""

from __future__ import annotations

from typing import Literal, get_args, get_origin

import click
import pytest
from click.testing import CliRunner

from prunecomp.cli.options import option_fields
from prunecomp.config import STAGES, CalibrationConfig, EvalConfig, PruneConfig


def _commands() -> dict[str, click.Command]:
    from flows.cli import main

    return {"prune": main.commands["prune"], "run": main.commands["run"]}


@pytest.mark.parametrize("command", ["prune", "run"])
def test_every_field_of_the_tree_has_one_option(command) -> None:
    params = {p.name: p for p in _commands()[command].params}
    mapped = option_fields()
    for section, model in (("prune", PruneConfig), ("calibration", CalibrationConfig), ("evaluation", EvalConfig)):
        for name, field in model.model_fields.items():
            param = next(p for p, where in mapped.items() if where == (section, name))
            assert param in params, f"{command}: no option for {section}.{name}"
            option = params[param]
            assert field.description and field.description in (option.help or "")
            if get_origin(field.annotation) is Literal:
                assert list(option.type.choices) == [str(v) for v in get_args(field.annotation)]
            assert option.stage == ("common" if field.json_schema_extra["common"] else field.json_schema_extra["stage"])


def test_help_lists_common_options_first_then_each_stage() -> None:
    text = CliRunner().invoke(_commands()["prune"], ["--help"]).output
    headings = [line.rstrip(":") for line in text.splitlines() if line and not line.startswith(" ")
                and line.endswith(":")]
    assert headings[0] == "Options"
    stages = [h.removesuffix(" (expert)").lower() for h in headings[1:]]
    assert stages == [s for s in STAGES if s in stages] and {"compensation", "refine", "reconstruct"} <= set(stages)
    assert text.index("--quality") < text.index("--compensation")


def test_bad_list_option_is_one_error_line(stories_dir, tmp_path) -> None:
    from prunecomp.cli import main

    result = CliRunner().invoke(main, ["prune", "--model", str(stories_dir), "--guard-exponents", "0,x,1",
                                       "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert result.exit_code == 2 and "--guard-exponents expects comma-separated float" in result.output


def test_prune_takes_the_run_parameter_file_and_flags_win(tmp_path, monkeypatch) -> None:
    """``prune --config``: the file format of ``run --config`` and the deployments (the prune section flat or as the
    tree of stages); flags given beside it replace their entries; keys only the pipeline uses are ignored."""
    import yaml

    from prunecomp.cli import commands

    seen = {}
    monkeypatch.setattr(commands, "_run", lambda job, json_out: seen.setdefault("job", job))
    monkeypatch.setattr(commands, "_write_plots", lambda *a: None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "quality": "best", "prune": {"removal": {"n_layers": 4}, "reconstruct": {"lr": 0.003}},
        "calibration": {"source": "c4", "n_samples": 16, "seq_len": 256}, "evaluation": None,
        "tracking": {"registered_model": "x"}, "max_ppl_ratio": 4.0}))
    out = tmp_path / "out"
    result = CliRunner().invoke(_commands()["prune"], ["--config", str(path), "--out", str(out), "--layers", "3",
                                                       "--calib-samples", "8"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    job = seen["job"]
    assert job.quality == "best" and job.prune.n_layers == 3 and job.prune.reconstruct == "both"
    assert job.prune.reconstruct_lr == 0.003 and job.calibration.n_samples == 8 and job.calibration.seq_len == 256
    assert job.evaluation is None and set(job.quality_overridden) == {"reconstruct_lr"}
    assert "prune.reconstruct: {method: both" in result.output
    path.write_text(yaml.safe_dump({"prune": {"n_layers": 2}, "evaluatoin": {}}))
    result = CliRunner().invoke(_commands()["prune"], ["--config", str(path), "--out", str(out)])
    assert result.exit_code == 2 and "error:" in result.output and "evaluatoin" in result.output
    assert "Traceback" not in result.output and not out.exists()
