"""Plots of a pruning run: real PNG files of a readable size from report dicts of both shapes, clear input errors,
``prunecomp prune --plots`` on the real small model, and ``prunecomp plot REPORT`` redrawing them from JSON."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tiny_models import tiny_model, tokens

from prunecomp.cli import main
from prunecomp.config import PruneConfig
from prunecomp.engine.loop import prune_and_compensate
from prunecomp.errors import PrunecompError
from prunecomp.evaluation.plots import PLOT_FILES, plot_ppl_curves, plot_scales, plot_scores, save_report_plots
from prunecomp.recipes.checkpoint import REPORT_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a valid PNG (signature + IHDR chunk), asserting it is one of non-trivial size."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 250, (width, height)
    return width, height


def _report(n_layers: int = 8, removed: tuple[int, ...] = (3, 5, 2)) -> dict[str, Any]:
    """A ``PruneReport.to_dict()``-shaped report: scores keyed by str(original index), removed layers absent."""
    steps, present = [], list(range(n_layers))
    for i, chosen in enumerate(removed):
        scores: dict[str, float | None] = {str(k): 0.05 + 0.01 * ((k * 7 + i) % 5) for k in present}
        scores[str(chosen)], scores["0"] = 0.01, 0.9  # the first layer dwarfs the rest, as BI's does
        scores[str(n_layers - 1)] = None  # a non-finite score is written as null
        steps.append({"step": i, "metric": "bi", "scores": scores, "chosen": chosen, "chosen_current": chosen,
                      "measured_scale": 1.05 + 0.02 * i, "applied_scale": 1.05 + 0.02 * i,
                      "layers_after": len(present) - 1, "seconds": 0.1})
        present.remove(chosen)
    return {"config": {"metric": "bi", "compensation": "magnitude"}, "source_num_layers": n_layers,
            "steps": steps, "removed": list(removed)}


def test_report_plots_are_valid_pngs(tmp_path) -> None:
    paths = save_report_plots(_report(), tmp_path / "plots")
    assert [p.name for p in paths] == [PLOT_FILES["scores"], PLOT_FILES["scales"]]  # no per-step perplexity
    for p in paths:
        _png_size(p)
    assert not list((tmp_path / "plots").glob(".*"))  # no temp files left behind


def test_pipeline_report_also_gets_the_perplexity_curve(tmp_path) -> None:
    """A pipeline run's report.json nests records under "record" and measures perplexity after every step."""
    flat = _report()
    report = {"config": {"prune": {"compensation": "none"}}, "base": {"num_layers": 8},
              "steps": [{"record": s, "ppl_before": {"c4": 10.0 + i}, "ppl_after": {"c4": 11.0 + 3 * i}}
                        for i, s in enumerate(flat["steps"])]}
    paths = save_report_plots(json.loads(json.dumps(report)), tmp_path)
    assert [p.name for p in paths] == [PLOT_FILES["scores"], PLOT_FILES["scales"], PLOT_FILES["perplexity"]]
    for p in paths:
        _png_size(p)


def test_each_plot_function(tmp_path) -> None:
    report = _report(n_layers=30, removed=(14, 25, 17, 13, 15))
    report["steps"][1]["applied_scale"] = 1.0  # e.g. --compensation none: measured but not applied
    _png_size(plot_scores(report, tmp_path / "s.png"))
    _png_size(plot_scales(report, tmp_path / "k.png"))
    _png_size(plot_ppl_curves({"prune&comp": [10.0, 14.0, 20.0], "no compensation": [12.0, 30.0, None]},
                              tmp_path / "p.png", dense=8.2, dataset="wikitext2"))


@pytest.mark.parametrize(("report", "message"), [
    ({}, "no pruning steps"),
    ({"steps": []}, "no pruning steps"),
    ({"steps": [{"step": 0}]}, "step 0 of the report has no 'scores'/'chosen'"),
    ([1, 2], "expected a prunecomp report"),
])
def test_bad_report_is_a_clear_error(tmp_path, report, message: str) -> None:
    with pytest.raises(PrunecompError, match=message):
        save_report_plots(report, tmp_path / "plots")
    assert not (tmp_path / "plots").exists()  # nothing written


@pytest.mark.parametrize(("curves", "message"), [
    ({}, "at least one curve"),
    ({"a": []}, "non-empty list"),
    ({"a": [1.0, "x"]}, "non-numeric"),
    ({"a": [5.0, -1.0]}, "positive perplexities"),
])
def test_bad_curves_are_a_clear_error(tmp_path, curves, message: str) -> None:
    with pytest.raises(PrunecompError, match=message):
        plot_ppl_curves(curves, tmp_path / "p.png")


def test_prune_writes_plots(stories_dir, tmp_path) -> None:
    fast = ["--calib-source", "tinystories", "--calib-samples", "4", "--calib-seq-len", "64", "--eval-datasets", ""]
    result = CliRunner().invoke(main, ["prune", "--model", str(stories_dir), "--layers", "2", *fast, "--out",
                                       str(tmp_path / "out"), "--plots", str(tmp_path / "plots")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in (PLOT_FILES["scores"], PLOT_FILES["scales"]):
        _png_size(tmp_path / "plots" / name)
    assert not (tmp_path / "plots" / PLOT_FILES["perplexity"]).exists()  # prune has no per-step perplexity
    result = CliRunner().invoke(main, ["prune", "--model", str(stories_dir), "--layers", "2", *fast, "--out",
                                       str(tmp_path / "out2"), "--plots", "s3://bucket/plots"])
    assert result.exit_code == 2 and "local folder" in result.output and not (tmp_path / "out2").exists()


@pytest.fixture(scope="module")
def real_report() -> dict[str, Any]:
    """A real ``prunecomp prune --json`` report: ``PruneReport.to_dict()`` of 3 removals from a tiny Llama, plus the
    keys the job adds (``seconds`` is a dict there, unlike the loop's float)."""
    report = prune_and_compensate(tiny_model("llama"), tokens(n=4, t=16), PruneConfig(n_layers=3), batch_size=2)
    return json.loads(json.dumps(report.to_dict() | {"source": {"uri": None}, "perplexity": {},
                                                     "seconds": {"prune": report.seconds}}))


def _plot(*args: str):
    return CliRunner().invoke(main, ["plot", *args], catch_exceptions=False)


def _written(output: str) -> list[Path]:
    return [Path(line.removeprefix("plot: ")) for line in output.splitlines() if line.startswith("plot: ")]


def test_plot_command_redraws_a_prune_report(real_report, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "R.json").write_text(json.dumps(real_report))
    result = _plot(str(run / "R.json"))  # default: beside the report
    assert result.exit_code == 0, result.output
    expected = [run / PLOT_FILES["scores"], run / PLOT_FILES["scales"]]
    assert _written(result.output) == expected
    for p in expected:
        _png_size(p)
    assert sorted(p.name for p in run.iterdir()) == sorted(["R.json", *(p.name for p in expected)])  # no temp files

    result = _plot(str(run / "R.json"), "--out", str(tmp_path / "new" / "plots"))  # created with its parents
    assert result.exit_code == 0, result.output
    assert _written(result.output) == [tmp_path / "new" / "plots" / p.name for p in expected]
    for p in _written(result.output):
        _png_size(p)


@pytest.mark.parametrize("shape", ["checkpoint-folder", "job-result", "pipeline"])
def test_plot_command_reads_every_report_shape(real_report, tmp_path, shape: str) -> None:
    """A pruned model folder (its prunecomp_report.json), a whole JobResult serialised (report under "report"), and
    a pipeline run's report.json (records under "record", per-step perplexity: a third plot)."""
    names = [PLOT_FILES["scores"], PLOT_FILES["scales"]]
    if shape == "checkpoint-folder":
        target = tmp_path / "model"
        target.mkdir()
        (target / REPORT_FILE).write_text(json.dumps(real_report))
    else:
        target = tmp_path / "report.json"
        data: dict[str, Any] = {"provenance": {}, "report": real_report, "perplexity": {}, "out": None}
        if shape == "pipeline":
            data = {"config": {"prune": {"compensation": "magnitude"}}, "base": {"num_layers": 6},
                    "steps": [{"record": s, "ppl_before": {"c4": 20.0 + i}, "ppl_after": {"c4": 21.0 + 2 * i}}
                              for i, s in enumerate(real_report["steps"])]}
            names.append(PLOT_FILES["perplexity"])
        target.write_text(json.dumps(data))
    result = _plot(str(target), "--out", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    assert _written(result.output) == [tmp_path / "plots" / n for n in names]
    for p in _written(result.output):
        _png_size(p)


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "cannot read report"),
    ("[1, 2]", "holds a JSON list, not a prunecomp report"),
    ('{"perplexity": {"c4": 10.0}}', "no pruning steps"),
    ('{"report": {"steps": []}}', "no pruning steps"),
    ('{"steps": [{"step": 0}]}', "step 0 of the report has no 'scores'/'chosen'"),
    # scores draw, the scale plot cannot: still nothing may land in --out
    ('{"steps": [{"scores": {"0": 0.5, "1": 0.1}, "chosen": 1}]}', "no numeric 'measured_scale'"),
])
def test_plot_command_bad_report_is_one_error_line(tmp_path, content, message: str) -> None:
    report = tmp_path / "in" / "R.json"
    report.parent.mkdir()
    if isinstance(content, bytes):
        report.write_bytes(content)
    elif content is not None:
        report.write_text(content)
    before = sorted(report.parent.iterdir())
    for out_args in ([], ["--out", str(tmp_path / "plots")]):
        result = _plot(str(report), *out_args)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], result.output
        assert "Traceback" not in result.output
        assert sorted(report.parent.iterdir()) == before and not (tmp_path / "plots").exists()  # nothing written


def test_plot_command_refuses_remote_or_unwritable_out(real_report, tmp_path) -> None:
    (tmp_path / "R.json").write_text(json.dumps(real_report))
    result = _plot(str(tmp_path / "R.json"), "--out", "s3://bucket/plots")
    assert result.exit_code == 2 and "error: --out writes PNG files to a local folder" in result.output
    (tmp_path / "file").write_text("x")
    result = _plot(str(tmp_path / "R.json"), "--out", str(tmp_path / "file"))
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.json", "file"]


def test_plot_is_a_command_of_the_console_script() -> None:
    """The installed ``prunecomp`` script runs flows.cli's group (library + pipeline commands): ``plot`` is on it."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="prunecomp")
    assert script.value == "flows.entry:main"
    result = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'prunecomp'; "
                             "from flows.entry import main; main()", "plot", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "REPORT" in result.stdout and "--out" in result.stdout, result.stdout
