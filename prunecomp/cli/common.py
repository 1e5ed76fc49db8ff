"""What every command shares: quiet environment, the consoles, and user errors as one ``error:`` line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from prunecomp.config import PruneConfig
from prunecomp.errors import PrunecompError
from prunecomp.models.redact import redact
from prunecomp.quiet import QUIET_ENV, quiet_environment, quiet_libraries

__all__ = ["QUIET_ENV", "choices", "console", "csv_ints", "out", "quiet_environment", "quiet_libraries",
           "user_errors"]

def choices(field: str) -> list[str]:
    """The values a :class:`~prunecomp.config.PruneConfig` field accepts (its ``Literal``), for ``click.Choice``:
    the CLI never lists them a second time."""
    from typing import get_args

    return [str(v) for v in get_args(PruneConfig.model_fields[field].annotation)]

console = Console(stderr=True)
out = Console()


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors (bad options, unreadable inputs, unreachable storage, failing gates): one line, exit code 2,
    with credentials masked (:func:`~prunecomp.models.redact.redact`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PrunecompError as exc:
            # the last line of defence: whatever URI a message quotes, its credentials are not printed
            console.print(f"[bold red]error:[/] {escape(redact(str(exc)))}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except ValidationError as exc:
            msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            console.print(f"[bold red]error:[/] invalid option: {escape(redact(msgs))}", highlight=False,
                          soft_wrap=True)
            sys.exit(2)

    return wrapper


def csv_ints(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise PrunecompError(f"--protect expects comma-separated layer indices like 0,-1, got {value!r}") from exc
