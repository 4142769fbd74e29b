"""Every ``benchmarks/...`` path that README.md and docs/*.md cite exists, and the benchmark entry point is sound."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CITED_PATH = re.compile(r"benchmarks/[A-Za-z0-9_./{},*-]*")
PLACEHOLDER = re.compile(r"[<>]|\bDIR\b|…")


def expanded(path: str) -> list[str]:
    """``a/{b,c}.md`` → ``a/b.md``, ``a/c.md`` (one brace group at a time)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if match is None:
        return [path]
    return [variant for option in match.group(1).split(",")
            for variant in expanded(path[:match.start()] + option + path[match.end():])]


def cited_paths(text: str) -> set[str]:
    """The ``benchmarks/...`` paths of a markdown text, trailing punctuation removed, placeholders skipped."""
    paths = set()
    for match in CITED_PATH.finditer(text):
        end = match.end()
        if end < len(text) and text[end] in "<…":  # benchmarks/results/<category>/...: a placeholder
            continue
        path = match.group(0).rstrip(".,:;")
        if not PLACEHOLDER.search(path):
            paths.update(expanded(path))
    return paths


def resolves(path: str) -> bool:
    """A cited path exists or a glob matches a file. A command's output (``--out benchmarks/results/x`` or
    ``x.json``: the scripts write ``x.json`` and ``x.md``) resolves when a file of that stem is committed."""
    if any(character in path for character in "*?"):
        return any(REPO.glob(path))
    target = REPO / path
    return target.exists() or any(target.parent.glob(target.stem + ".*"))


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(d.relative_to(REPO)) for d in DOCUMENTS])
def test_every_cited_benchmarks_path_exists(document: Path) -> None:
    missing = sorted(path for path in cited_paths(document.read_text()) if not resolves(path))
    assert not missing, f"{document.relative_to(REPO)} cites paths that do not exist: {missing}"


def test_cited_path_extraction_handles_braces_placeholders_and_punctuation() -> None:
    text = ("see `benchmarks/results/{cflow,fastflow}_x.{json,md}`, benchmarks/results/<category>/<row>.json and "
            "(benchmarks/results/a.md). Run `python benchmarks/evaluate.py --out DIR/x`.")
    assert cited_paths(text) == {"benchmarks/results/cflow_x.json", "benchmarks/results/cflow_x.md",
                                 "benchmarks/results/fastflow_x.json", "benchmarks/results/fastflow_x.md",
                                 "benchmarks/results/a.md", "benchmarks/evaluate.py"}


def test_results_keep_only_a_small_cited_set() -> None:
    assert len([p for p in (REPO / "benchmarks" / "results").rglob("*") if p.is_file()]) <= 60


def _regenerate(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "regenerate.py"), *arguments], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=120)


def test_regenerate_help_and_dry_run_list_existing_scripts_without_running_them() -> None:
    help_run = _regenerate("--help")
    assert help_run.returncode == 0 and "--dry-run" in help_run.stdout
    dry = _regenerate("--dry-run")
    assert dry.returncode == 0, dry.stderr
    scripts = re.findall(r"\] python (benchmarks/\S+\.py)", dry.stdout)
    assert "benchmarks/accuracy_table.py" in scripts and "benchmarks/edge_pairs.py" in scripts
    assert all((REPO / script).is_file() for script in scripts), scripts
    assert "README.md (accuracy)" in dry.stdout and "docs/export.md (default precision)" in dry.stdout
    only = _regenerate("--dry-run", "--only", "export")
    assert "[checkpoints]" in only.stdout and "[accuracy]" not in only.stdout  # export needs the checkpoints
    wrong = _regenerate("--only", "nonsense")
    assert wrong.returncode != 0 and "accuracy" in wrong.stderr  # names the allowed groups


def test_copied_tables_match_the_committed_results() -> None:
    check = _regenerate("--check-tables")
    assert check.returncode == 0, check.stdout + check.stderr
