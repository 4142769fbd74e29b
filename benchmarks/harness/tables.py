"""The tables that README.md and docs/ copy from result files, and their rewriting between markers.

Each table sits between an opening marker (``<!-- accuracy table -->``) and a closing one
(``<!-- end accuracy table -->``); the two lines after the opening marker are the table's header and stay as written,
the body is rendered from the committed result files. ``rewrite_tables`` replaces every body, ``stale_tables`` lists
the ones whose body differs from what the results give.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


EDGE_PAIR_MODELS = {"cflow": "CflowAD", "fastflow": "FastFlow", "csflow": "CSFlow (Csflow on its trunk)",
                    "csflow-stock": "CSFlow (stock Csflow)"}


def edge_readme_rows(result: dict[str, Any]) -> list[str]:
    """README edge rows of an ``edge_pairs.py`` result: ms per call ours vs anomalib's at the default precision and
    with the f32 hint, the speed-ups, and our whole graph ÷ its backbone alone at the default precision."""

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    def ratio(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}×"

    rows = []
    for row in result["pairs"]:
        if row["pair"] not in EDGE_PAIR_MODELS:
            continue
        for batch in result["batch_sizes"]:
            times, ratios = row[f"b{batch}"], row["ratios"][f"b{batch}"]
            rows.append(f"| {EDGE_PAIR_MODELS[row['pair']]} | {row['image_size']} | {batch} | "
                        f"{ms(times['ours/default'])} | {ms(times['anomalib/default'])} | "
                        f"{ratio(ratios['default']['speedup'])} | {ms(times['ours/f32'])} | "
                        f"{ms(times['anomalib/f32'])} | {ratio(ratios['f32']['speedup'])} | "
                        f"{ratio(ratios['default']['ours_vs_backbone'])} |")
    return rows


def alarms(row: dict[str, Any]) -> str:
    """``"false alarms/normal images"`` of a ``default_precision.py`` row."""
    return f"{row['false_alarms']}/{row['normal_images']}"


def default_precision_rows(result: dict[str, Any]) -> list[str]:
    """docs/export.md rows of a ``default_precision.py`` result: the shipped (marked) IR at the default precision
    against torch, latencies at the default precision and with the f32 hint, and the IRs with the backbone (and
    head) in the fast precision."""
    rows = []
    for model in result["models"]:
        if model["model"].startswith("anomalib."):
            continue
        variants = {(row["variant"], row["precision"]): row for row in model["rows"]}
        marked, hinted = variants[("marked", "default")], variants[("marked", "f32")]
        cells = [f"| {model['model']} | {model['image_size']} | {alarms(model['rows'][0])} | "
                 f"{marked['image_AUROC_delta']:+.4f} / {marked['pixel_AUROC_delta']:+.4f}, {alarms(marked)} | "
                 f"{marked['label_differences']} | {marked['latency_ms_b1']} / {marked['latency_ms_b8']} | "
                 f"{hinted['latency_ms_b1']} / {hinted['latency_ms_b8']} |"]
        for name in ("backbone", "tail"):
            row = variants[(name, "default")]
            cells.append(f" {row['image_AUROC_delta']:+.4f} / {row['pixel_AUROC_delta']:+.4f}, {alarms(row)} | "
                         f"{row['latency_ms_b1']} / {row['latency_ms_b8']} |")
        rows.append("".join(cells))
    return rows


def _accuracy_rows() -> list[str]:
    from accuracy_table import readme_rows  # benchmarks/ is on sys.path wherever the harness is imported

    return readme_rows()


def _json(relative: str) -> dict[str, Any]:
    return json.loads((REPO / relative).read_text())


@dataclass(frozen=True)
class MarkedTable:
    """A table copied into a document: where it is, its markers, and how its body is rendered."""

    name: str
    document: str
    opening: str
    closing: str
    render: Callable[[], list[str]]


TABLES = (
    MarkedTable("accuracy", "README.md", "<!-- accuracy table -->", "<!-- end accuracy table -->", _accuracy_rows),
    MarkedTable("edge", "README.md", "<!-- edge table: benchmarks/results/edge_pairs.json -->",
                "<!-- end edge table -->", lambda: edge_readme_rows(_json("benchmarks/results/edge_pairs.json"))),
    MarkedTable("default precision", "docs/export.md",
                "<!-- default precision table: benchmarks/results/default_precision.json -->",
                "<!-- end default precision table -->",
                lambda: default_precision_rows(_json("benchmarks/results/default_precision.json"))),
)


def _pattern(table: MarkedTable) -> re.Pattern[str]:
    return re.compile(re.escape(table.opening) + r"\n(\|[^\n]*\n\|[^\n]*\n)(.*?)" + re.escape(table.closing),
                      re.DOTALL)


def table_body(table: MarkedTable, repo: Path = REPO) -> list[str]:
    """The body lines of ``table`` as its document holds them now."""
    text = (repo / table.document).read_text()
    match = _pattern(table).search(text)
    if match is None:
        msg = f"{table.document}: markers {table.opening!r} … {table.closing!r} with a two-line header not found."
        raise ValueError(msg)
    return match.group(2).strip().splitlines()


def stale_tables(repo: Path = REPO) -> list[str]:
    """Names of the tables whose document differs from what the committed results render."""
    return [table.name for table in TABLES if table_body(table, repo) != table.render()]


def rewrite_tables(repo: Path = REPO) -> list[str]:
    """Rewrite every marked table's body from the results; return the names of the tables that changed."""
    changed = []
    for table in TABLES:
        rows = table.render()
        if table_body(table, repo) == rows:
            continue
        path = repo / table.document
        text = path.read_text()
        path.write_text(_pattern(table).sub(lambda match, rows=rows, table=table: (
            table.opening + "\n" + match.group(1) + "\n".join(rows) + "\n" + table.closing), text, count=1))
        changed.append(table.name)
    return changed
