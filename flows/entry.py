"""The ``prunecomp`` console script: quiet the environment before anything imports tqdm or transformers (tqdm
reads ``TQDM_DISABLE`` once, at import), then run :data:`flows.cli.main`. Importing no module of the package
changes the environment; only running the command does."""

from __future__ import annotations

import os

__all__ = ["main"]

_QUIET = {"DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
          "TQDM_DISABLE": "1"}


def main() -> None:
    for key, value in _QUIET.items():  # the same as prunecomp.cli.QUIET_ENV (tested), set before its import
        os.environ.setdefault(key, value)
    from flows.cli import main as cli

    cli()
