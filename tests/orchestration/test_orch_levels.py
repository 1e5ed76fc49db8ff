"""Quality levels through the pipeline's parameters: ``run --quality``, config files and Prefect's round trip."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from flows.params import CompressConfig
from prunecomp.config import PruneConfig
from prunecomp.levels import FIT_WINDOWS_MIN


def test_level_fills_the_prune_fields_the_parameters_leave_out() -> None:
    best = CompressConfig.model_validate({"quality": "best", "prune": {"n_layers": 3}})
    assert (best.prune.reconstruct, best.prune.refine, best.prune.reconstruct_steps) == ("both", "channels", 100)
    assert best.prune.refine_samples == FIT_WINDOWS_MIN and best.quality_overridden == {}
    assert CompressConfig().prune == PruneConfig(n_layers=5)  # fast, the default, is today's guarded default


def test_fields_given_under_prune_override_the_level_and_are_recorded() -> None:
    config = CompressConfig.model_validate({"quality": "best",
                                            "prune": {"n_layers": 5, "reconstruct_lr": 0.003, "refine_samples": 128}})
    assert config.prune.reconstruct_lr == 0.003 and config.prune.refine_samples == 128
    assert config.quality_overridden == {"reconstruct_lr": {"level": 0.001, "given": 0.003},
                                         "refine_samples": {"level": FIT_WINDOWS_MIN, "given": 128}}
    again = CompressConfig.model_validate(config.model_dump(mode="json"))  # Prefect's parameter round trip
    assert again == config
    assert CompressConfig.model_validate(CompressConfig(quality="best", prune=PruneConfig(n_layers=2)).model_dump(
        mode="json")).prune.reconstruct == "both"


def test_run_cli_passes_the_level_and_only_the_flags_given(monkeypatch) -> None:
    from flows import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_flow", lambda config, *a, **k: seen.setdefault("config", config))
    result = CliRunner().invoke(cli.main, ["run", "--quality", "balanced", "--layers", "3", "--refine-steps", "7"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.quality == "balanced" and config.prune.refine == "channels" and config.prune.refine_steps == 7
    assert config.quality_overridden == {"refine_steps": {"level": 80, "given": 7}}


def test_the_reconstruct_deployment_runs_best(tmp_path) -> None:
    from pathlib import Path

    path = Path(__file__).parents[2] / "deployments" / "configs" / "compress-smollm2-reconstruct.yaml"
    config = CompressConfig.model_validate(yaml.safe_load(path.read_text()))
    assert config.quality == "best" and config.prune.reconstruct == "both" and config.prune.refine == "channels"
    assert set(config.quality_overridden) == {"reconstruct_lr", "refine_samples"}


def _build(monkeypatch, *args: str):
    from flows import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_flow", lambda config, *a, **k: seen.setdefault("config", config))
    result = CliRunner().invoke(cli.main, ["run", *args], catch_exceptions=False)
    return result, seen.get("config")


def test_config_file_and_flags_merge_flags_win(monkeypatch, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"quality": "best",
                                    "prune": {"metric": "bi", "n_layers": 5, "reconstruct_lr": 0.003},
                                    "calibration": {"source": "c4", "n_samples": 32, "seq_len": 512, "seed": 0,
                                                    "batch_size": 4},
                                    "tracking": {"registered_model": "from-file"}}))
    result, config = _build(monkeypatch, "--config", str(path), "--layers", "3", "--calib-samples", "16",
                            "--refine-steps", "9", "--registered-model", "from-flag")
    assert result.exit_code == 0, result.output
    assert config.prune.n_layers == 3 and config.prune.refine_steps == 9 and config.prune.reconstruct_lr == 0.003
    assert config.calibration.n_samples == 16 and config.calibration.seq_len == 512  # the rest from the file
    assert config.tracking.registered_model == "from-flag" and config.quality == "best"
    assert config.quality_overridden == {"reconstruct_lr": {"level": 0.001, "given": 0.003},
                                         "refine_steps": {"level": 80, "given": 9}}
    result, config = _build(monkeypatch, "--config", str(path))  # no flags: the file as written
    assert config.prune.n_layers == 5 and config.calibration.n_samples == 32


def test_a_config_file_may_give_the_tree_of_stages_and_flags_still_win(monkeypatch, tmp_path) -> None:
    """The prune section as the configuration tree (stage -> settings, as the effective configuration prints it)
    merges with flags that name flat fields; the level sees the same given settings either way."""
    path = tmp_path / "tree.yaml"
    path.write_text(yaml.safe_dump({"quality": "best", "prune": {
        "removal": {"n_layers": 5}, "scoring": {"metric": "bi"}, "reconstruct": {"lr": 0.003}}}))
    result, config = _build(monkeypatch, "--config", str(path), "--reconstruct-steps", "40")
    assert result.exit_code == 0, result.output
    assert (config.prune.n_layers, config.prune.reconstruct, config.prune.reconstruct_lr,
            config.prune.reconstruct_steps) == (5, "both", 0.003, 40)
    assert set(config.quality_overridden) == {"reconstruct_lr", "reconstruct_steps"}
    flat = CompressConfig.model_validate({"quality": "best", "prune": {"n_layers": 5, "reconstruct_lr": 0.003,
                                                                       "reconstruct_steps": 40}})
    assert flat.prune == config.prune
    path.write_text(yaml.safe_dump({"prune": {"reconstruct": {"stpes": 3}}}))
    result, config = _build(monkeypatch, "--config", str(path))
    assert result.exit_code == 2 and config is None and "stpes" in result.output and "Traceback" not in result.output


def test_unknown_key_in_a_config_file_is_one_error_line(monkeypatch, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"prune": {"n_layers": 5, "refine_stpes": 3}}))
    result, config = _build(monkeypatch, "--config", str(path))
    assert result.exit_code == 2 and config is None
    assert "error:" in result.output and "refine_stpes" in result.output and "Traceback" not in result.output


def test_effective_configuration_is_printed_at_the_start(monkeypatch) -> None:
    from flows import cli

    monkeypatch.setattr(cli, "_embedded_defaults", lambda: None)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    import flows.compress

    monkeypatch.setattr(flows.compress.compress, "with_options", stop)
    result = CliRunner().invoke(cli.main, ["run", "--quality", "best", "--reconstruct-lr", "0.003"])
    assert isinstance(result.exception, Stop)
    assert "configuration (quality best, overridden: reconstruct_lr=0.003):" in result.output
    assert "prune.reconstruct: {method: both" in result.output


def test_prune_and_run_read_a_parameter_file_and_flags_the_same_way(monkeypatch, tmp_path) -> None:
    """One merge for both commands: the same file and flags give ``prune`` and ``run`` the same level, pruning
    fields, calibration and evaluation; the file's keys are exactly the pipeline's parameters."""
    from prunecomp.cli import commands
    from prunecomp.cli.parameters import FILE_KEYS, PIPELINE_KEYS

    assert set(FILE_KEYS) | set(PIPELINE_KEYS) == set(CompressConfig.model_fields) - {"quality_overridden"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "quality": "balanced", "prune": {"scoring": {"metric": "angular"}, "removal": {"fraction": 0.2}},
        "calibration": {"n_samples": 16, "seq_len": 256}, "evaluation": {"datasets": ["c4"], "max_windows": 3},
        "tracking": {"registered_model": "x"}}))
    args = ["--config", str(path), "--layers", "3", "--refine-steps", "9", "--eval-seq-len", "128"]
    seen = {}
    monkeypatch.setattr(commands, "_run", lambda job, json_out: seen.setdefault("job", job))
    monkeypatch.setattr(commands, "_write_plots", lambda *a: None)
    result = CliRunner().invoke(commands.main, ["prune", *args, "--out", str(tmp_path / "o")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result, config = _build(monkeypatch, *args)
    assert result.exit_code == 0, result.output
    job = seen["job"]
    assert job.prune == config.prune and job.quality == config.quality == "balanced"
    assert job.quality_overridden == config.quality_overridden == {"refine_steps": {"level": 80, "given": 9}}
    assert job.calibration == config.calibration and job.evaluation == config.evaluation
    assert (job.prune.n_layers, job.prune.fraction, job.prune.metric) == (3, None, "angular")
    assert (job.calibration.n_samples, job.evaluation.seq_len, job.evaluation.max_windows) == (16, 128, 3)
    assert config.tracking.registered_model == "x"
