"""Read the offline copies of the QA sets (layout of ``../shared/data``) into their Hugging Face Hub schema.

The task YAMLs are lm-eval's own, written against the Hub datasets. Rebuilding that schema from the local files (the
MosaicML llm-foundry ``{query, choices, gold}`` jsonl, PIQA's official files, llama.cpp's HellaSwag text) lets one
config, hence one prompt, serve both sources, so a local score is comparable with a published lm-eval score.

Every record is checked while reading: a missing file, a line that is not JSON, a missing field or an out-of-range
label raises :class:`~prunecomp.errors.EvaluationError` naming the file, the line and the expected format,
rather than a ``KeyError`` deep inside lm-eval.

Known difference from the Hub data: HellaSwag's llama.cpp text keeps ``ctx`` (``ctx_a + " " + ctx_b``) where lm-eval
uses ``ctx_a + " " + ctx_b.capitalize()``, so the first letter of ``ctx_b`` stays lower-case (see SOURCES.md).
"""

from __future__ import annotations

import bz2
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunecomp.errors import EvaluationError

__all__ = ["LOCAL_SETS", "LocalSet", "read_local"]

Doc = dict[str, Any]
_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class LocalSet:
    """Where a task's local copy lives under the data dir, and the split name the task YAML evaluates."""

    path: str
    split: str
    read: Callable[[Path], list[Doc]]


def _fail(path: Path, expected: str, problem: str) -> EvaluationError:
    return EvaluationError(f"{path}: {problem}; expected {expected}")


def _jsonl(path: Path, expected: str, fields: dict[str, type | tuple[type, ...]]) -> list[Doc]:
    """Parse a jsonl file, checking that every record has ``fields`` with the right types."""
    if not path.is_file():
        raise _fail(path, expected, "data file not found")
    records: list[Doc] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise _fail(path, expected, f"line {lineno} is not valid JSON ({err.msg})") from err
            if not isinstance(rec, dict):
                raise _fail(path, expected, f"line {lineno} is not a JSON object")
            for name, kind in fields.items():
                if not isinstance(rec.get(name), kind) or isinstance(rec.get(name), bool):
                    raise _fail(path, expected, f"line {lineno}: field {name!r} missing or not {_type_name(kind)}")
            records.append(rec)
    if not records:
        raise _fail(path, expected, "file is empty")
    return records


def _type_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _choices(path: Path, expected: str, rec: Doc, lineno: int, n: int | None = None) -> list[str]:
    """The ``choices`` of a ``{query, choices, gold}`` record, with ``gold`` checked against them."""
    choices = rec["choices"]
    if not choices or not all(isinstance(c, str) for c in choices) or (n is not None and len(choices) != n):
        raise _fail(path, expected, f"line {lineno}: 'choices' must be {n or 'some'} strings")
    if not 0 <= rec["gold"] < len(choices):
        raise _fail(path, expected, f"line {lineno}: 'gold' {rec['gold']} is not an index into 'choices'")
    return choices


_MC = "jsonl, one {query: str, choices: [str], gold: int} per line (llm-foundry format)"
_MC_FIELDS: dict[str, type | tuple[type, ...]] = {"query": str, "choices": list, "gold": int}


def _read_arc(path: Path) -> list[Doc]:
    """``Question: <q>`` -> the Hub's ``question`` / ``choices.{text,label}`` / ``answerKey``."""
    expected = _MC.replace("query: str", 'query: "Question: ..."')
    docs = []
    for i, rec in enumerate(_jsonl(path, expected, _MC_FIELDS), start=1):
        choices = _choices(path, expected, rec, i)
        if not rec["query"].startswith("Question: "):
            raise _fail(path, expected, f"line {i}: 'query' does not start with 'Question: '")
        labels = list(_LETTERS[: len(choices)])
        docs.append({"id": str(i), "question": rec["query"][len("Question: "):],
                     "choices": {"text": choices, "label": labels}, "answerKey": labels[rec["gold"]]})
    return docs


def _read_openbookqa(path: Path) -> list[Doc]:
    docs = []
    for i, rec in enumerate(_jsonl(path, _MC, _MC_FIELDS), start=1):
        choices = _choices(path, _MC, rec, i)
        labels = list(_LETTERS[: len(choices)])
        docs.append({"id": str(i), "question_stem": rec["query"],
                     "choices": {"text": choices, "label": labels}, "answerKey": labels[rec["gold"]]})
    return docs


def _read_boolq(path: Path) -> list[Doc]:
    """``Passage: <p>\\nQuestion: <q>?`` with choices ``[no, yes]`` -> ``passage`` / ``question`` / ``label``."""
    expected = _MC.replace("query: str", 'query: "Passage: ...\\nQuestion: ...?"').replace("[str]", '["no", "yes"]')
    docs = []
    for i, rec in enumerate(_jsonl(path, expected, _MC_FIELDS), start=1):
        _choices(path, expected, rec, i, n=2)
        passage, sep, question = rec["query"].rpartition("\nQuestion: ")
        if rec["choices"] != ["no", "yes"] or not sep or not passage.startswith("Passage: "):
            raise _fail(path, expected, f"line {i}: not a 'Passage: ...\\nQuestion: ...' query with [no, yes]")
        docs.append({"idx": i - 1, "passage": passage[len("Passage: "):], "question": question.removesuffix("?"),
                     "label": rec["gold"]})
    return docs


def _read_copa(path: Path) -> list[Doc]:
    """``<premise without period>, because|therefore`` -> ``premise`` / ``question`` / ``choice1,2`` / ``label``."""
    expected = _MC.replace("query: str", 'query: "<premise>, because|therefore"').replace("[str]", "[str, str]")
    docs = []
    for i, rec in enumerate(_jsonl(path, expected, _MC_FIELDS), start=1):
        choice1, choice2 = _choices(path, expected, rec, i, n=2)
        premise, sep, connector = rec["query"].rpartition(", ")
        if not sep or connector not in ("because", "therefore"):
            raise _fail(path, expected, f"line {i}: 'query' does not end in ', because' or ', therefore'")
        docs.append({"idx": i - 1, "premise": premise + ".", "choice1": choice1, "choice2": choice2,
                     "question": "cause" if connector == "because" else "effect", "label": rec["gold"]})
    return docs


def _read_winogrande(path: Path) -> list[Doc]:
    """``{context_options: [a, b], continuation, gold}`` -> ``sentence`` with ``_`` / ``option1,2`` / ``answer``.

    The two contexts are the sentence up to the blank filled with each option: their common prefix plus the two
    tails reproduce lm-eval's contexts exactly, even when the options themselves share a prefix.
    """
    expected = "jsonl, one {context_options: [str, str], continuation: str, gold: 0|1} per line (llm-foundry format)"
    docs = []
    fields: dict[str, type | tuple[type, ...]] = {"context_options": list, "continuation": str, "gold": int}
    for i, rec in enumerate(_jsonl(path, expected, fields), start=1):
        options = rec["context_options"]
        if len(options) != 2 or not all(isinstance(o, str) for o in options) or rec["gold"] not in (0, 1):
            raise _fail(path, expected, f"line {i}: need two string context_options and gold 0 or 1")
        stem = _common_prefix(*options)
        if "_" in stem:
            raise _fail(path, expected, f"line {i}: context has an '_' before the blank")
        docs.append({"sentence": f"{stem}_ {rec['continuation']}", "option1": options[0][len(stem):],
                     "option2": options[1][len(stem):], "answer": str(rec["gold"] + 1)})
    return docs


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _read_lambada(path: Path) -> list[Doc]:
    """``{context, continuation}`` -> ``text`` (lm-eval splits the last word back off)."""
    expected = "jsonl, one {context: str, continuation: str} per line (llm-foundry format)"
    docs = []
    for i, rec in enumerate(_jsonl(path, expected, {"context": str, "continuation": str}), start=1):
        if not rec["continuation"] or " " in rec["continuation"]:
            raise _fail(path, expected, f"line {i}: 'continuation' must be one word")
        docs.append({"text": f"{rec['context']} {rec['continuation']}"})
    return docs


def _read_piqa(path: Path) -> list[Doc]:
    """The official ``valid.jsonl`` (``goal, sol1, sol2``) plus ``valid-labels.lst`` (the source of ``baber/piqa``).

    Preferred over the llm-foundry copy, which strips trailing spaces from 118 solutions and so changes tokens.
    """
    expected = "valid.jsonl with {goal, sol1, sol2} per line and valid-labels.lst with one 0/1 per line (official PIQA)"
    docs = _jsonl(path, expected, {"goal": str, "sol1": str, "sol2": str})
    labels_path = path.with_name("valid-labels.lst")
    if not labels_path.is_file():
        raise _fail(labels_path, expected, "data file not found")
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(docs) or any(label not in ("0", "1") for label in labels):
        raise _fail(labels_path, expected, f"need {len(docs)} labels, each 0 or 1 (found {len(labels)})")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}
            for d, label in zip(docs, labels, strict=True)]


def _read_hellaswag(path: Path) -> list[Doc]:
    """llama.cpp's text: per item ``<activity_label>: <ctx>``, the gold index, then the four endings."""
    expected = ("bz2 text, 6 lines per item: '<activity_label>: <ctx>', the gold index 0-3, 4 endings "
                "(llama.cpp hellaswag format)")
    if not path.is_file():
        raise _fail(path, expected, "data file not found")
    try:
        with bz2.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise _fail(path, expected, f"cannot read as bz2 text ({err})") from err
    if not lines or len(lines) % 6:
        raise _fail(path, expected, f"{len(lines)} lines is not a positive multiple of 6")
    docs = []
    for start in range(0, len(lines), 6):
        head, gold, *endings = lines[start:start + 6]
        label, sep, ctx = head.partition(": ")
        if not sep or gold not in ("0", "1", "2", "3"):
            raise _fail(path, expected, f"item at line {start + 1} is malformed")
        docs.append({"ind": start // 6, "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": endings, "label": gold})
    return docs


LOCAL_SETS: dict[str, LocalSet] = {
    "piqa": LocalSet("piqa/valid.jsonl", "validation", _read_piqa),
    "arc_easy": LocalSet("arc_easy/arc_easy.llmfoundry.jsonl", "test", _read_arc),
    "arc_challenge": LocalSet("arc_challenge/arc_challenge.llmfoundry.jsonl", "test", _read_arc),
    "hellaswag": LocalSet("hellaswag/hellaswag_val_full.txt.bz2", "validation", _read_hellaswag),
    "winogrande": LocalSet("winogrande/winogrande.llmfoundry.jsonl", "validation", _read_winogrande),
    "boolq": LocalSet("boolq/boolq.llmfoundry.jsonl", "validation", _read_boolq),
    "openbookqa": LocalSet("openbookqa/openbook_qa.llmfoundry.jsonl", "test", _read_openbookqa),
    "copa": LocalSet("copa/copa.llmfoundry.jsonl", "validation", _read_copa),
    "lambada_openai": LocalSet("lambada_openai/lambada_openai.llmfoundry.jsonl", "test", _read_lambada),
}


def read_local(task: str, data_dir: str | Path) -> list[Doc]:
    """All evaluation records of ``task`` from ``data_dir``, in the task's Hub schema (raises EvaluationError)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise EvaluationError(f"data directory not found: {root}")
    source = LOCAL_SETS[task]
    return source.read(root / source.path)
