"""Library command-line interface: ``prunecomp prune``, ``apply``, ``eval-ppl``, ``eval`` and ``plot`` (no Prefect).

The installed ``prunecomp`` script is :mod:`flows.cli`, which builds its own group from these commands plus the
pipeline's (``run``...). Every command validates its options into the library's typed configs first, so bad input
fails in one line before any model is loaded; a :class:`~prunecomp.errors.PrunecompError` becomes ``error: ...``
on stderr and exit code 2.

Modules: :mod:`~prunecomp.cli.common` (environment, consoles, errors), :mod:`~prunecomp.cli.options` (options
derived from the config types), :mod:`~prunecomp.cli.render` (progress, tables), :mod:`~prunecomp.cli.commands`.
"""

from prunecomp.cli.commands import main
from prunecomp.cli.common import QUIET_ENV, choices, quiet_environment, user_errors
from prunecomp.cli.options import explicit_options, preset_settings, pruning_options

__all__ = ["QUIET_ENV", "choices", "explicit_options", "main", "preset_settings", "pruning_options",
           "quiet_environment", "user_errors"]
