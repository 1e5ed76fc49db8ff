"""The ``prunecomp`` console script: quiet the environment before anything imports tqdm or transformers (tqdm
reads ``TQDM_DISABLE`` once, at import), then run :data:`flows.cli.main`. Importing no module of the package
changes the environment; only running the command does."""

from __future__ import annotations

import os

__all__ = ["main"]

_QUIET = {"DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
          "TQDM_DISABLE": "1"}


# Prefect reads its settings when it is imported: the first start of the embedded server migrates a fresh
# database, which takes longer than Prefect's 20 s default on a loaded machine (seen: 43 s with two benchmarks
# running), so the wait is set here, before anything imports Prefect.
_PREFECT = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def main() -> None:
    for key, value in (_QUIET | _PREFECT).items():  # _QUIET: prunecomp.quiet.QUIET_ENV (tested), set before import
        os.environ.setdefault(key, value)
    from flows.cli import main as cli

    cli()
