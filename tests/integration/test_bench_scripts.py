"""The GPU smoke script runs (on CPU, tiny model): it is what a lent GPU machine executes, so it must not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_gpu_smoke_script_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--device", "cpu", "--small",
                           "--samples", "8", "--seq-len", "64", "--refine-steps", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and {r["check"] for r in result["rows"]} >= {
        "in-memory lsq", "in-memory refine", "in-memory magnitude", "streamed magnitude"}
    assert "bit-identical: True" in next(r["detail"] for r in result["rows"] if r["check"] == "in-memory lsq")


def test_results_doc_is_generated_from_the_result_files() -> None:
    """docs/RESULTS.md is what bench/results_doc.py builds from bench/results/: no hand-typed number drifts."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "results_doc.py"), "--check"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
