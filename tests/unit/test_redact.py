"""Credentials never reach a log, a journal or an error line: userinfo (whatever the password holds) and the
query-string signatures and tokens of presigned URLs are masked, and nothing else is."""

from __future__ import annotations

import pytest

from prunecomp.models.redact import redact, redact_all


@pytest.mark.parametrize(("uri", "expected"), [
    ("postgresql://u:pw@h/db", "postgresql://***@h/db"),
    ("s3://key:secret@bucket/p", "s3://***@bucket/p"),
    ("https://tok@github.com/org/repo@v1", "https://***@github.com/org/repo@v1"),
    # a password holding '/', '@' or ':', pasted unencoded
    ("s3://AKIA:wJal/rXUt+nF@bucket/prefix", "s3://***@bucket/prefix"),
    ("https://user:pa/ss@host/model", "https://***@host/model"),
    ("https://user:p@ss:w0rd@host/model", "https://***@host/model"),
    ("https://user@host/m", "https://***@host/m"),
    # presigned and token URLs: the value goes, the name stays
    ("https://b.s3.amazonaws.com/m.gguf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024&"
     "X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=FQo%2Fz&X-Amz-Signature=abc123",
     "https://b.s3.amazonaws.com/m.gguf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&"
     "X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://host/m?token=abc/def", "https://host/m?token=***"),
    ("https://host/m?TOKEN=abc#part", "https://host/m?TOKEN=***#part"),
    ("https://acct.blob.core.windows.net/c/m?sv=2022&sig=Zm9v%3D", "https://acct.blob.core.windows.net/c/m?sv=2022&sig=***"),
    ("https://host/m?api_key=k&password=p&access_token=t&Signature=s&key=v&secret=x&rev=main",
     "https://host/m?api_key=***&password=***&access_token=***&Signature=***&key=***&secret=***&rev=main"),
    ("https://u:p@host/m?token=t", "https://***@host/m?token=***"),
    # a URI inside a URI is a URI of its own
    ("s3://bucket/x?next=https://u:p@h/y", "s3://bucket/x?next=https://***@h/y"),
])
def test_credentials_are_masked(uri: str, expected: str) -> None:
    assert redact(uri) == expected
    assert redact(expected) == expected  # idempotent: a redacted value stays as it is


@pytest.mark.parametrize("uri", [
    "s3://bucket/prefix/run", "sqlite:///.prunecomp/mlflow.db", "file:///tmp/a@b", "/local/path@v1",
    "git+https://github.com/org/repo@v1", "HuggingFaceTB/SmolLM2-135M", "https://host/m?revision=main&sort=asc",
    "s3://bucket/key@version"])
def test_nothing_else_changes(uri: str) -> None:
    assert redact(uri) == uri


def test_whole_messages_are_redacted() -> None:
    """An error line may quote several URIs, with repr quotes and an exception's text after them."""
    line = ("cannot read 's3://AKIA:se/cret@bucket/runs/r/run.json': ClientError: https://bucket.s3/x?"
            "X-Amz-Signature=deadbeef denied; store s3://bucket/p")
    out = redact(line)
    assert "se/cret" not in out and "deadbeef" not in out and "AKIA" not in out
    assert out == ("cannot read 's3://***@bucket/runs/r/run.json': ClientError: https://bucket.s3/x?"
                   "X-Amz-Signature=*** denied; store s3://bucket/p")


def test_documents_are_redacted_throughout() -> None:
    doc = {"model": "https://h/m.gguf?X-Amz-Signature=sig1", "tracking": ("postgresql://u:pa/ss@h/db", 3),
           "steps": [{"uri": "s3://k:s@b/steps/a"}], "n": 1.5}
    assert redact_all(doc) == {"model": "https://h/m.gguf?X-Amz-Signature=***",
                               "tracking": ("postgresql://***@h/db", 3), "steps": [{"uri": "s3://***@b/steps/a"}],
                               "n": 1.5}


def test_the_pipeline_uses_the_same_rule() -> None:
    from tasks import settings

    assert settings.redact is redact and settings.redact_all is redact_all


def test_library_error_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """The library CLI's error printer masks credentials whatever message a module raised."""
    from prunecomp.cli.common import user_errors
    from prunecomp.errors import PrunecompError

    @user_errors
    def fails() -> None:
        raise PrunecompError("model 'https://user:pa/ss@host/m?token=abc' does not exist")

    with pytest.raises(SystemExit) as exit_info:
        fails()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error:" in err
    assert "pa/ss" not in err and "abc" not in err and "https://***@host/m?token=***" in err
