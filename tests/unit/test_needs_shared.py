"""A missing ../shared fails the suite in CI instead of skipping most of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_probe.py"
    test.write_text("from tests.needs_shared import missing\n\n\n"
                    "def test_probe():\n    missing('shared data missing')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)} | ({"CI": "true"} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_missing_shared_skips_locally_and_fails_in_ci(tmp_path: Path) -> None:
    local = _run(tmp_path, ci=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
    ci = _run(tmp_path, ci=True)
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "CI needs ../shared" in ci.stdout, ci.stdout
