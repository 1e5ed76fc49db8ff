"""`prunecomp resume` never takes --allow-pickle / --trust-remote-code from a run's journal: the journal lies in a
store others may write, and both options let a model run code. The flag must be given again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from prunecomp.errors import PrunecompError

pytestmark = pytest.mark.orchestration


def _journal(store: Path, **options: Any) -> tuple[str, dict[str, Any]]:
    from flows.journal import journal_uri
    from flows.params import CompressConfig
    from tasks.settings import locations

    config = CompressConfig.model_validate({"model": "org/some-model", "tracking": {"store": str(store)}, **options})
    run = config.run_id()
    journal = {"run_id": run, "status": "running", "config": config.model_dump(mode="json"), "store": str(store),
               "steps": []}
    path = Path(journal_uri(locations(str(store)), run))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(journal))
    return run, journal


@pytest.mark.parametrize(("options", "flags"), [({"allow_pickle": True}, ["--allow-pickle"]),
                                                ({"trust_remote_code": True}, ["--trust-remote-code"]),
                                                ({"allow_pickle": True, "trust_remote_code": True},
                                                 ["--allow-pickle", "--trust-remote-code"])])
def test_resume_refuses_without_the_flag_again(tmp_path: Path, options: dict[str, bool], flags: list[str]) -> None:
    from flows.cli import main

    store = tmp_path / "store"
    run, _ = _journal(store, **options)
    result = CliRunner().invoke(main, ["resume", run, "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and all(flag in result.output for flag in flags)
    assert f"prunecomp resume {run} {' '.join(flags)}" in " ".join(result.output.split())
    if len(flags) == 2:  # one of the two is not enough
        result = CliRunner().invoke(main, ["resume", run, "--store", str(store), flags[0]])
        assert result.exit_code == 2 and flags[1] in result.output


def test_resume_keeps_the_run_when_the_flag_is_given(tmp_path: Path) -> None:
    from flows.cli import resume_config

    _, journal = _journal(tmp_path / "store", allow_pickle=True, trust_remote_code=True)
    with pytest.raises(PrunecompError, match="--allow-pickle and --trust-remote-code"):
        resume_config(journal)
    config = resume_config(journal, allow_pickle=True, trust_remote_code=True)
    assert config.allow_pickle and config.trust_remote_code and config.run_id() == journal["run_id"]
    _, plain = _journal(tmp_path / "plain")
    # a flag the run was not started with changes nothing: same parameters, same run
    config = resume_config(plain, allow_pickle=True)
    assert not config.allow_pickle and config.run_id() == plain["run_id"]

