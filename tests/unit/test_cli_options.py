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
