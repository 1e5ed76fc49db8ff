"""Quality levels: one table in code, applied under the flags the user gave, with the overrides recorded."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from prunecomp.config import PruneConfig
from prunecomp.levels import FIT_WINDOWS_MIN, LEVELS, apply_level, level_settings


def test_every_level_is_a_valid_config_and_fast_is_the_default() -> None:
    for level in LEVELS:
        config, overridden = apply_level(PruneConfig(n_layers=3), level, 8)
        assert overridden == {}
        for name, value in level_settings(level, 8).items():
            assert getattr(config, name) == value
    assert apply_level(PruneConfig(n_layers=3), "fast", 8)[0] == PruneConfig(n_layers=3)


def test_levels_add_stages_in_order() -> None:
    fast, balanced, best = (apply_level(PruneConfig(n_layers=3), lv, 8)[0] for lv in ("fast", "balanced", "best"))
    assert (fast.refine, fast.reconstruct) == ("none", "none")
    assert (balanced.refine, balanced.reconstruct) == ("channels", "none")
    assert (best.refine, best.reconstruct) == ("channels", "both")


def test_fit_windows_are_a_rule_of_the_calibration_size() -> None:
    assert level_settings("best", 8)["refine_samples"] == FIT_WINDOWS_MIN
    assert level_settings("best", 128)["refine_samples"] == 128  # never fewer than the scoring windows
    assert "refine_samples" not in level_settings("fast", 8)


def test_explicit_flags_override_the_level_and_are_recorded() -> None:
    given = PruneConfig(n_layers=3, reconstruct_lr=3e-3, compensation="magnitude")
    config, overridden = apply_level(given, "best", 8, explicit={"reconstruct_lr", "compensation", "n_layers"})
    assert config.reconstruct_lr == 3e-3 and config.compensation == "magnitude" and config.reconstruct == "both"
    assert overridden == {"reconstruct_lr": {"level": 1e-3, "given": 3e-3},
                          "compensation": {"level": "guarded", "given": "magnitude"}}


def test_unknown_level_is_one_clear_error() -> None:
    from prunecomp.errors import PrunecompError

    with pytest.raises(PrunecompError, match="--quality must be one of fast, balanced, best"):
        level_settings("ultra", 8)


def test_prune_cli_takes_a_level_and_records_it(stories_dir, tmp_path) -> None:
    from prunecomp.cli import main

    out, js = tmp_path / "out", tmp_path / "r.json"
    result = CliRunner().invoke(main, [
        "prune", "--model", str(stories_dir), "--layers", "1", "--quality", "balanced", "--refine-steps", "2",
        "--calib-source", "tinystories", "--calib-samples", "4", "--calib-seq-len", "64", "--eval-datasets", "",
        "--out", str(out), "--json", str(js)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())
    assert report["quality"] == {"level": "balanced",
                                 "overridden": {"refine_steps": {"level": 80, "given": 2}}}
    assert report["config"]["refine"] == "channels" and report["config"]["refine_samples"] == FIT_WINDOWS_MIN
    assert json.loads((out / "prunecomp_report.json").read_text())["quality"]["level"] == "balanced"
