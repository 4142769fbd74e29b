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


def edge_readme_rows(result: dict[str, Any]) -> list[str]:
    """README edge rows of a ``benchmark.py --edge`` result: ms per call (f32 hint, plugin default) ours vs
    anomalib's, and both IR sizes in MB."""
    ratios = {(r["ours"], r["backend"], r["batch_size"]): r for r in result["ratios"] if r["device"] == "cpu"}
    rows = []
    for ours, theirs in (("CflowAD", "anomalib.Cflow"), ("FastFlow", "anomalib.Fastflow"),
                         ("CSFlow", "anomalib.Csflow")):
        for batch in sorted({key[2] for key in ratios if key[0] == ours and key[1] == "openvino-fp32"}):
            f32, default = ratios[(ours, "openvino-fp32", batch)], ratios[(ours, "openvino-default", batch)]
            exports = [result["models"][name]["sizes"][str(f32["image_size"])]["export"] for name in (ours, theirs)]
            sizes = [export.get("model", export)["bytes"]["openvino-fp32"] / 1e6 for export in exports]
            rows.append(f"| {ours} | {batch} | {f32['latency_ms'][0]:.1f} | {f32['latency_ms'][1]:.1f} | "
                        f"{default['latency_ms'][0]:.1f} | {default['latency_ms'][1]:.1f} | "
                        f"{sizes[0]:.1f} / {sizes[1]:.1f} |")
    return rows


def default_precision_rows(result: dict[str, Any]) -> list[str]:
    """docs/export.md rows of a ``default_precision.py`` result: the shipped (marked) IR at the default precision
    against torch, latencies at the default precision and with the f32 hint, and the tail-only and unmarked IRs."""
    rows = []
    for model in result["models"]:
        variants = {(row["variant"], row["precision"]): row for row in model["rows"]}
        marked, hinted = variants[("marked", "default")], variants[("marked", "f32")]
        tail, unmarked = variants[("tail", "default")], variants[("unmarked", "default")]
        rows.append(f"| {model['model']} | {model['image_size']} | {marked['image_AUROC_delta']:+.4f} / "
                    f"{marked['pixel_AUROC_delta']:+.4f} | {marked['label_differences']} | {marked['latency_ms_b1']} / "
                    f"{marked['latency_ms_b8']} | {hinted['latency_ms_b1']} / {hinted['latency_ms_b8']} | "
                    f"{tail['image_AUROC_delta']:+.4f} / {tail['pixel_AUROC_delta']:+.4f} | {tail['latency_ms_b1']} / "
                    f"{tail['latency_ms_b8']} | {unmarked['image_AUROC_delta']:+.4f} / "
                    f"{unmarked['pixel_AUROC_delta']:+.4f} |")
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
    MarkedTable("edge", "README.md", "<!-- edge table: benchmarks/results/bench/edge.json -->",
                "<!-- end edge table -->", lambda: edge_readme_rows(_json("benchmarks/results/bench/edge.json"))),
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
