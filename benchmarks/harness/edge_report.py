"""The edge view of a result document: ours ÷ anomalib, ours ÷ backbone, multiply-add rates, per-op profiles.

A cell's multiply-add rate = multiply-adds per image (``torch.utils.flop_counter`` on the torch module, batch 1)
× images per second measured in that cell: how much of the CPU's arithmetic the whole graph and the backbone alone
turn into useful work.
"""

from __future__ import annotations

from typing import Any

PRECISION_LABELS = {"openvino-default": "OV default", "openvino-fp32": "OV f32", "openvino-int8": "OV INT8"}


def _cells(result: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    return {(cell["model"], cell.get("part", "model"), cell["backend"], cell["image_size"], cell["batch_size"]): cell
            for cell in result["cells"] if cell.get("status") == "ok" and cell["device"] == "cpu"}


def multiply_add_rate(cell: dict[str, Any]) -> float | None:
    """G multiply-adds per second achieved in ``cell`` (``None`` without a count)."""
    macs = cell.get("multiply_adds_per_image")
    return None if not macs else macs * cell["throughput_img_s"] / 1e9


def edge_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, backend, size, batch) with a whole-model cell: ms/image, ratios, rates."""
    cells = _cells(result)
    specs = result["models"]
    rows = []
    for (model, part, backend, size, batch), cell in cells.items():
        if part != "model":
            continue
        info = specs.get(model, {})
        partner = next((name for name, other in specs.items() if other.get("family") == info.get("family")
                        and other.get("ours") != info.get("ours")), None)
        theirs = cells.get((partner, "model", backend, size, batch)) if info.get("ours") else None
        backbone = cells.get((model, "backbone", backend, size, batch))
        rows.append({
            "model": model, "ours": info.get("ours"), "backend": backend, "image_size": size, "batch_size": batch,
            "precision": cell.get("precision"), "ms_per_image": round(1e3 / cell["throughput_img_s"], 3),
            "backbone_ms_per_image": round(1e3 / backbone["throughput_img_s"], 3) if backbone else None,
            "ours_over_anomalib_time": (round(theirs["throughput_img_s"] / cell["throughput_img_s"], 3)
                                        if theirs else None),
            "model_over_backbone_time": (round(backbone["throughput_img_s"] / cell["throughput_img_s"], 3)
                                         if backbone else None),
            "gmacs_per_image": round(cell["multiply_adds_per_image"] / 1e9, 3)
            if cell.get("multiply_adds_per_image") else None,
            "gmac_per_s": _round(multiply_add_rate(cell)),
            "backbone_gmac_per_s": _round(multiply_add_rate(backbone)) if backbone else None,
        })
    order = list(PRECISION_LABELS)
    rows.sort(key=lambda row: (row["image_size"], row["batch_size"], order.index(row["backend"])
                               if row["backend"] in order else len(order), row["backend"], row["model"]))
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _text(value: Any, suffix: str = "") -> str:
    return "–" if value is None else f"{value}{suffix}"


def edge_table(result: dict[str, Any]) -> list[str]:
    """The README's edge table (markdown): per model and OpenVINO precision, time per image and the two ratios."""
    machine = result["machine"]
    flags = ", ".join(flag for flag, present in (machine.get("isa_flags") or {}).items() if present) or "none listed"
    lines = [f"CPU: {machine['cpu']} ({flags}); {machine['threads']} threads; OpenVINO "
             f"{machine['versions'].get('openvino')}. Time = 1 / measured img/s; ratios > 1: the first is slower.",
             "",
             "| model | runtime | px | batch | precision | ms/image | backbone ms/image | ours ÷ anomalib (time) | "
             "model ÷ backbone (time) | GMAC/image | GMAC/s model | GMAC/s backbone |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in edge_rows(result):
        lines.append(
            f"| {row['model']} | {PRECISION_LABELS.get(row['backend'], row['backend'])} | {row['image_size']} | "
            f"{row['batch_size']} | {_text(row['precision'])} | {row['ms_per_image']} | "
            f"{_text(row['backbone_ms_per_image'])} | {_text(row['ours_over_anomalib_time'], '×')} | "
            f"{_text(row['model_over_backbone_time'], '×')} | {_text(row['gmacs_per_image'])} | "
            f"{_text(row['gmac_per_s'])} | {_text(row['backbone_gmac_per_s'])} |")
    return lines


def print_edge_ratios(result: dict[str, Any]) -> str:
    """Plain text for the terminal: ours ÷ anomalib and ours ÷ backbone, and the multiply-add rates."""
    lines = []
    for row in edge_rows(result):
        lines.append(
            f"{row['model']:<20} {row['backend']:<17} {row['image_size']}px b{row['batch_size']}: "
            f"{row['ms_per_image']} ms/img; ÷anomalib {_text(row['ours_over_anomalib_time'], '×')}, "
            f"÷backbone {_text(row['model_over_backbone_time'], '×')}; GMAC/s model {_text(row['gmac_per_s'])}, "
            f"backbone {_text(row['backbone_gmac_per_s'])}")
    return "\n".join(lines) or "no whole-model OpenVINO cell succeeded"


def profile_table(result: dict[str, Any], top: int = 8) -> list[str]:
    """Per model and profiled cell, the ``top`` node types by OpenVINO real time per call."""
    lines = ["| model | cell | precision | wall ms/call | top node types (ms/call) |", "|---|---|---|---:|---|"]
    for name, model in result["models"].items():
        for size, entry in model.get("sizes", {}).items():
            for cell, profile in (entry.get("profiles") or {}).items():
                if "error" in profile:
                    lines.append(f"| {name} | {size}px {cell} | – | – | error: `{profile['error'][:200]}` |")
                    continue
                ops = ", ".join(f"{op} {ms}" for op, ms in list(profile["op_ms_per_call"].items())[:top])
                lines.append(f"| {name} | {size}px {cell} | {profile.get('precision')} | "
                             f"{profile['wall_ms_per_call']} | {ops} |")
    return lines


def profiles(result: dict[str, Any]) -> dict[str, Any]:
    """Just the per-op profiles, by model, size and cell (for a results file of their own)."""
    return {name: {size: entry.get("profiles") or {} for size, entry in model.get("sizes", {}).items()}
            for name, model in result["models"].items()}
