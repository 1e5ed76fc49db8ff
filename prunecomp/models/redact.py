"""Credentials out of everything a run shows or keeps: URIs, error lines, journals, logs, tags.

Why here, in the library: the library's own error lines (``model 'https://user:pw@host/...' does not exist``) and
the pipeline's journals and logs need the same rule, and the library may not import the pipeline's modules.

Two kinds of secret travel inside a URI:

* userinfo, ``scheme://user:password@host`` or ``scheme://token@host``. Secrets are often pasted unencoded, so a
  password may hold ``/``, ``@`` or ``:`` (AWS secret keys hold ``/``). The userinfo therefore runs to the last
  ``@`` of the authority, and, when the text before the first ``/`` holds a ``:`` (``user:pa`` of
  ``user:pa/ss@host``, which a ``host:port`` cannot be told apart from), to the last ``@`` of the whole URI. That
  can also hide a harmless ``@`` further on (``https://host:8080/a@b`` shows as ``https://***@b``): showing too
  little of a URI is the cheap mistake, showing a password the expensive one.
* query-string (or fragment) credentials of presigned and token URLs: ``?X-Amz-Signature=...``, ``&token=...``,
  ``#access_token=...``. The value of every parameter whose name says secret (signature, credential, token, key,
  password, secret, auth..., any case) becomes ``***``; the name stays, so the line still says what was there.

:func:`redact` works on a whole message as well as on a bare URI: every URI in the text is treated. Nothing here
imports anything beyond the standard library.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "redact", "redact_all"]

MASK = "***"

# scheme://, then the rest of the URI: up to white space, a quote (messages quote URIs with repr) or the next
# scheme:// (a URI inside a query, ``?next=https://u:p@h``, is a URI of its own)
_SCHEME = r"\b[A-Za-z][A-Za-z0-9+.-]*://"
_URI = re.compile(rf"(?P<scheme>{_SCHEME})(?P<rest>(?:(?!{_SCHEME})[^\s'\"<>`])*)")
# a parameter whose name says "secret": the value is masked up to the next separator
_SECRET_NAME = (r"(?:sig|[\w.-]*(?:signature|credential|token|secret|passw|pwd|key|auth|session)"
                r"[\w.-]*)")
_QUERY_SECRET = re.compile(rf"(?P<lead>[?&#;]{_SECRET_NAME}=)(?P<value>[^&#;\s'\"<>`]*)", re.IGNORECASE)


def _strip_userinfo(rest: str) -> str:
    """``rest`` (what follows ``scheme://``) with its userinfo masked."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        return MASK + rest[authority.rindex("@"):]
    if ":" in authority and "@" in rest:
        return MASK + rest[rest.rindex("@"):]  # user:pa/ss@host: a password holding '/', '?' or '#'
    return rest


def _uri(match: re.Match[str]) -> str:
    return match["scheme"] + _strip_userinfo(match["rest"])


def redact(text: str) -> str:
    """``text`` (a URI or a message holding URIs) with every userinfo and query-string credential masked."""
    if "://" in text:
        text = _URI.sub(_uri, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: m["lead"] + (MASK if m["value"] else ""), text)
    return text


def redact_all(obj: Any) -> Any:
    """``obj`` (dicts, lists, tuples, strings, pydantic dumps) with :func:`redact` applied to every string: what a
    run writes to its journal, report, logs, console and MLflow."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact_all(v) for v in obj)
    return obj
