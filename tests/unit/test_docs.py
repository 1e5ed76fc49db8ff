"""The docs say what the code does: the README's two commands and every `prunecomp ...` example in the README,
docs/*.md and deployments/README.md parse with the real CLI, every relative link (and its #anchor) resolves, the
README's quality-level table quotes what bench/results_doc.py computes, and the docs speak of versions and commits,
not of the history of their writing."""

from __future__ import annotations

import itertools
import re
import shlex
import sys
from pathlib import Path

import click
import pytest

from prunecomp.levels import MEASURED_RECOVERY, MEASURED_SECONDS

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deployments" / "README.md"]
TWO_COMMANDS = ("bash scripts/install.sh && .venv/bin/prunecomp run", "bash scripts/install.sh && bash scripts/test.sh")

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def _split(text: str) -> tuple[list[str], list[str]]:
    """(lines inside fenced code blocks, continuation lines joined; lines outside them)."""
    code, prose, inside, pending = [], [], False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            prose.append(line)
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        code.append(pending + line)
        pending = ""
    return code, prose


def _cli_tokens(command: str) -> list[str] | None:
    """The arguments after `prunecomp` in one shell command, or None when it does not run prunecomp."""
    command = re.sub(r"\s#\s.*$", "", command).strip()  # a trailing comment
    try:
        tokens = shlex.split(command)
    except ValueError:
        return None
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens or not (tokens[0] == "prunecomp" or tokens[0].endswith("/prunecomp")):
        return None
    return tokens[1:]


def examples() -> list[tuple[str, str, bool]]:
    """(where, command, partial) for every `prunecomp ...` example: lines of code blocks (each `&&` / `;`
    segment: complete commands) and inline code spans in the prose (mentions: partial)."""
    found = []
    for path in DOCS:
        code, prose = _split(path.read_text())
        where = str(path.relative_to(ROOT))
        for line in code:
            for segment in re.split(r"&&|;|\|\|", line):
                if _cli_tokens(segment) is not None:
                    found.append((where, segment.strip(), False))
        for line in prose:
            for span in INLINE.findall(line):
                if re.match(r"^(\.venv/bin/)?prunecomp(\s|$)", span) and _cli_tokens(span) is not None:
                    found.append((where, span, True))
    return found


def _variants(tokens: list[str]) -> list[list[str]]:
    """Usage notation made concrete: `[X]` -> X, `...` dropped, `a|b` or `a/b` in the command position -> each."""
    tokens = [t.replace("[", "").replace("]", "") for t in tokens if t not in ("...", "…")]
    tokens = [t for t in tokens if t]
    if not tokens:
        return [[]]
    heads = re.split(r"[|/]", tokens[0]) if re.fullmatch(r"[a-z-]+([|/][a-z-]+)+", tokens[0]) else [tokens[0]]
    rest = [t.split("|") if re.fullmatch(r"[A-Za-z0-9_.+-]+(\|[A-Za-z0-9_.+-]+)+", t) else [t] for t in tokens[1:]]
    return [[h, *combo] for h in heads for combo in itertools.product(*rest)]


def parse(args: list[str], partial: bool = False) -> None:
    """Parse ``prunecomp ARGS`` with the real CLI (``flows.cli:main``) without running anything: the subcommand's
    options, arguments and value types (choices, ints, floats) are checked by click's ``make_context``. ``partial``
    (an inline mention such as `prunecomp prune --stream-layers`): a required parameter it leaves out gets a
    placeholder value, everything it does say must parse."""
    from flows.cli import main

    if not args:  # `prunecomp` alone prints the command list
        return
    name, rest = args[0], list(args[1:])
    command = main.get_command(click.Context(main, info_name="prunecomp"), name)
    assert command is not None, f"no such command: prunecomp {name}"
    for _ in range(len(command.params) + 1):
        try:
            command.make_context(name, list(rest))
            return
        except click.exceptions.Exit as done:  # an example with --help
            assert done.exit_code == 0
            return
        except click.MissingParameter as missing:
            if not partial or missing.param is None:
                raise
            opt = getattr(missing.param, "opts", [None])[0]
            rest += [opt, "X"] if isinstance(missing.param, click.Option) else ["X"]


def test_the_readme_keeps_its_two_commands() -> None:
    code, _ = _split((ROOT / "README.md").read_text())
    for command in TWO_COMMANDS:
        assert command in code, f"README lost the command {command!r}"
    parse(_cli_tokens(TWO_COMMANDS[0].split("&&")[1]) or [])


def test_there_are_cli_examples_to_check() -> None:
    where = {w for w, _c, partial in examples() if not partial}
    assert {"README.md", "docs/ARCHITECTURE.md", "docs/EVALUATION.md"} <= where


@pytest.mark.parametrize(("where", "command", "partial"), examples(),
                         ids=lambda v: str(v) if len(str(v)) < 60 else str(v)[:57] + "...")
def test_every_cli_example_parses(where: str, command: str, partial: bool) -> None:
    tokens = _cli_tokens(command)
    assert tokens is not None
    for args in _variants(tokens):
        try:
            parse(args, partial)
        except click.ClickException as exc:
            pytest.fail(f"{where}: `{command}` does not parse: {exc.format_message()}")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces -> -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = _split(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        _, prose = _split(path.read_text())
        for line in prose:
            for target in LINK.findall(line):
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                    found.append((str(path.relative_to(ROOT)), target))
    return found


@pytest.mark.parametrize(("where", "target"), links())
def test_every_relative_link_resolves(where: str, target: str) -> None:
    file, _, anchor = target.partition("#")
    path = (ROOT / where).parent / file if file else ROOT / where
    assert path.exists(), f"{where}: link to {target!r}: {path} does not exist"
    if anchor and path.suffix == ".md":
        assert anchor in anchors(path), f"{where}: link to {target!r}: no heading with that anchor in {file or where}"


HISTORY = re.compile(r"\b(before|since|until|after|in|of) session\b|\bsessions? \d+|\bissue #\d+|\bsession \d+",
                     re.IGNORECASE)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_speak_of_versions_not_history(path: Path) -> None:
    hits = [line.strip()[:120] for line in path.read_text().splitlines() if HISTORY.search(line)]
    assert not hits, f"history words in {path.relative_to(ROOT)} (history belongs in git): {hits}"


CODE = sorted(p for d in ("prunecomp", "flows", "tasks", "tests", "bench", "deployments") for p in (ROOT / d).rglob("*")
              if p.suffix in (".py", ".yaml", ".sh") and "results" not in p.parts)


def test_the_code_speaks_of_versions_not_history() -> None:
    """Code, help text, tests, benchmarks and deployments too: no session or issue numbers (git log keeps them)."""
    hits = [f"{p.relative_to(ROOT)}: {line.strip()[:100]}" for p in CODE
            for line in p.read_text(errors="replace").splitlines() if HISTORY.search(line)]
    assert not hits, hits


def _results_doc():  # bench/ is not a package: imported by path, as bench/results_doc.py imports its neighbours
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import results_doc
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return results_doc


def test_the_readme_quotes_the_measured_quality_levels() -> None:
    """Each level's row in the README's table, and ``--help`` (``prunecomp.levels.MEASURED_RECOVERY``), carry the
    numbers the result files give (mean PPL and recovered at k = 3, 5, 8): over the calibration seeds for a level
    the levels' seed files measured (the mean over the seeds, and the worst seed's recovered share), else from its
    single run, or "not yet measured"."""
    import json

    rd = _results_doc()
    readme = (ROOT / "README.md").read_text()

    def line_of(level: str) -> str:
        line = next((ln for ln in readme.splitlines() if ln.startswith("|") and f"`--quality {level}`" in ln), None)
        assert line is not None, f"the README's quality table has no row for --quality {level}"
        return line

    seeded: set[str] = set()
    seeds = sorted((ROOT / "bench" / "results").glob(rd.LEVEL_SEEDS))
    if seeds:
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            import quality
        finally:
            sys.path.remove(str(ROOT / "bench"))
        for row in quality.level_rows([json.loads(p.read_text()) for p in seeds]):
            if row.level in quality.ANCHORS or row.k not in (3, 5, 8):
                continue
            seeded.add(row.level)
            want = [f"{row.mean_ppl:.2f}", f"{row.mean_recovered:.1f}%", f"{row.worst_recovered:.1f}%"]
            assert all(w in line_of(row.level) for w in want), f"--quality {row.level} at k = {row.k}: {want}"
            quoted = MEASURED_RECOVERY[row.level][(3, 5, 8).index(row.k)]  # what --help says
            assert quoted == pytest.approx(row.mean_recovered, abs=0.05), (row.level, row.k, row.mean_recovered)
            seconds = [s for s in row.seconds if s is not None]
            assert MEASURED_SECONDS[row.level][(3, 5, 8).index(row.k)] == pytest.approx(
                sum(seconds) / len(seconds), abs=0.5), (row.level, row.k, "seconds")
    everything = rd._load(rd.QUALITY + rd.GUARDED + rd.REFINED + rd.ANCHORS)
    all_rows = rd.rows(everything)
    table = rd.lowest(all_rows)
    dense = everything[0][1]["dense"]["ppl"]["mean"]
    for level, got in rd.level_rows(all_rows).items():
        if level in seeded:
            continue
        line = line_of(level)
        if got is None:
            assert "not yet measured" in line, f"--quality {level} has no result file: say 'not yet measured'"
            continue
        for k in (3, 5, 8):
            r = got[k]
            naive = rd.naive_for(table, r.metric, r.variant, k)
            assert f"{r.ppl:.2f}" in line, f"--quality {level} at k = {k}: the README should say {r.ppl:.2f}"
            assert f"{rd.recovered(r.ppl, naive.ppl, dense):.1f}%" in line, f"--quality {level} at k = {k}: recovered"
            quoted = MEASURED_RECOVERY[level][(3, 5, 8).index(k)]  # what --help says
            assert quoted == pytest.approx(rd.recovered(r.ppl, naive.ppl, dense), abs=0.05), (level, k)
            assert r.seconds is not None and MEASURED_SECONDS[level][(3, 5, 8).index(k)] == pytest.approx(
                r.seconds, abs=0.5), (level, k, "seconds")


def test_best_is_the_minimum_within_the_budget_whatever_the_file_order() -> None:
    rd = _results_doc()

    def row(file: str, ppl: float, seconds: float | None) -> object:
        return rd.Row(file, "bi", "refine-reconstruct", 3, ppl, (13, 14, 17), seconds, "-", {})

    rows = [row("a", 50.70, 874.0), row("b", 50.88, 972.0), row("c", 49.0, 5000.0), row("d", 48.0, None)]
    for ordered in (rows, rows[::-1]):
        best = rd.best_within_budget(ordered, 3)
        assert best is not None and best.file == "a"  # c is over the budget, d has no recorded time
        assert rd.lowest(ordered)[("bi", "refine-reconstruct", 3)].file == "d"
    assert rd.recovered(50.0, 70.0, 40.0) == pytest.approx(200 / 3)
    naive = rd.Row("q", "bi", "iterative", 3, 68.25, (), None, "-", {})
    table = {("bi", "iterative", 3): naive, ("bi", "one-shot", 3): rd.Row("q", "bi", "one-shot", 3, 74.56, (), None,
                                                                         "-", {})}
    assert rd.naive_for(table, "bi", "guarded", 3) is naive  # every product variant is iterative
    assert rd.naive_for(table, "bi", "one-shot", 3).ppl == 74.56
    assert rd.naive_for(table, "block", "replaceme", 3) is None
