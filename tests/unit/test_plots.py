"""Plots of a pruning run: real PNG files of a readable size from report dicts of both shapes, clear input errors,
and ``prunecomp prune --plots`` on the real small model."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from prunecomp.cli import main
from prunecomp.errors import PrunecompError
from prunecomp.plots import PLOT_FILES, plot_ppl_curves, plot_scales, plot_scores, save_report_plots

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
