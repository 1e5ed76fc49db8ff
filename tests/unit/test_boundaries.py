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


def test_cli_modules_change_no_environment_at_import_and_share_options() -> None:
    """Importing the CLIs sets no variable (only running the command does); the pipeline's group is its own (the
    library's is not mutated); ``run`` and ``prune`` share one declaration of their common options."""
    import os
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ); import prunecomp.cli, flows.cli; "
            "print(sorted(k for k in os.environ if os.environ.get(k) != before.get(k)))")
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr

    import flows.cli
    import flows.entry
    import prunecomp.cli

    assert flows.entry._QUIET == prunecomp.cli.QUIET_ENV
    assert flows.cli.main is not prunecomp.cli.main and "run" not in prunecomp.cli.main.commands
    assert set(prunecomp.cli.main.commands) <= set(flows.cli.main.commands)
    prune = {p.name for p in prunecomp.cli.main.commands["prune"].params}
    run = {p.name for p in flows.cli.main.commands["run"].params}
    assert {"metric", "compensation", "refine", "calib_seq_len", "allow_pickle"} <= prune & run
    choice = next(p for p in flows.cli.main.commands["run"].params if p.name == "compensation")
    assert list(choice.type.choices) == prunecomp.cli.choices("compensation") == ["guarded", "magnitude", "none", "lsq"]


def test_console_script_gives_prefects_embedded_server_time_to_start() -> None:
    """Prefect reads its settings at import; the first start of the embedded server migrates a fresh database,
    slower than Prefect's 20 s default on a loaded machine: the console script sets the wait before any import."""
    code = ("import sys; sys.argv = ['prunecomp', '--help']\nfrom flows.entry import main\ntry:\n    main()\n"
            "except SystemExit:\n    pass\nfrom prefect.settings import get_current_settings\n"
            "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_EPHEMERAL")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "180", out.stdout[-500:] + out.stderr


LAYERS = [("cli",), ("engine",), ("recipes",), ("method",), ("evaluation", "levels"), ("models", "corpora"),
          ("config", "quiet"), ("errors",)]
"""The library's packages from the top down: a package imports only from itself and the layers below it."""


def test_the_library_imports_point_one_way() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "prunecomp"
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    found = {p.stem if p.parent == root else p.relative_to(root).parts[0] for p in root.rglob("*.py")} - {"__init__"}
    assert found == set(layer), f"packages not placed in LAYERS: {sorted(found ^ set(layer))}"
    upward = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        me = rel.stem if len(rel.parts) == 1 else rel.parts[0]
        if me == "__init__":
            continue
        for target in re.findall(r"^\s*(?:from|import) prunecomp\.(\w+)", path.read_text(), re.M):
            if target != me and layer[target] <= layer[me]:
                upward.append(f"{rel} imports prunecomp.{target}")
    assert not upward, upward


def test_module_map_names_every_module() -> None:
    """A newcomer finds every module of the library, the tasks and the flows in the module map of
    docs/ARCHITECTURE.md (linked from the README)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "ARCHITECTURE.md").read_text()
    module_map = doc[doc.index("## Module map"):]
    modules = [p for pkg in ("prunecomp", "tasks", "flows") for p in sorted((root / pkg).rglob("*.py"))]
    missing = [str(p.relative_to(root)) for p in modules
               if p.name != "__init__.py" and "/evaluation/tasks/" not in str(p) and f"`{p.name}`" not in module_map]
    assert not missing, f"not in the module map of docs/ARCHITECTURE.md: {missing}"
