"""Dependencies point one way: importing the library (every module of it) never imports Prefect or MLflow."""

from __future__ import annotations

import subprocess
import sys


def test_library_imports_no_orchestration() -> None:
    code = (
        "import importlib, pkgutil, sys, prunecomp\n"
        "for m in pkgutil.walk_packages(prunecomp.__path__, 'prunecomp.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('prefect', 'mlflow', 'flows', 'tasks'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
