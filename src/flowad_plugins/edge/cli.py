"""``flowad-predict``: score images with an exported model using only openvino, numpy and Pillow.

``flowad-predict model.xml images/ --out results/`` writes ``results.csv`` (a row per image, as it goes),
``results.json`` (model, threshold, results, skipped files) and ``overlays/<name>_overlay.png``. Unreadable images
are skipped with a warning naming them. Exit status: 0 when an image was scored, 1 when none could be read, 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from flowad_plugins.edge.images import ImageReadError, find_images, read_image, resize_image
from flowad_plugins.edge.overlay import save_overlay
from flowad_plugins.edge.runtime import EDGE_PRECISIONS, EdgeModel, Prediction
from flowad_plugins.edge.thresholds import choose_threshold

CSV_COLUMNS = ("path", "score", "label", "threshold", "threshold_source", "reason", "overlay")

__all__ = ["main", "predict_images"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowad-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="exported model: OpenVINO model.xml (with model.bin) or .onnx")
    parser.add_argument("images", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("flowad-results"), help="output folder (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per inference call (default: 1)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="explicit image threshold on the normalised score in (0, 1); 0.5 = the model's")
    parser.add_argument("--precision", choices=sorted(EDGE_PRECISIONS), default="auto",
                        help="auto: the CPU's default for our marked IRs, float32 otherwise (default: %(default)s)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (default: CPU)")
    parser.add_argument("--num-threads", type=int, default=None, help="CPU inference threads")
    parser.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    return parser


def _progress(total: int) -> tuple[Callable[[int], None], Callable[[str], None], Callable[[], None]]:
    """(advance, warn, close): a tqdm bar on stderr when tqdm is installed, else a counter line."""
    try:
        from tqdm import tqdm
    except ImportError:
        done = [0]

        def advance(count: int) -> None:
            done[0] += count
            sys.stderr.write(f"\r{done[0]}/{total} images")
            sys.stderr.flush()

        def warn(message: str) -> None:
            sys.stderr.write(f"\r{message}\n")

        return advance, warn, lambda: sys.stderr.write("\n")
    bar = tqdm(total=total, unit="image", file=sys.stderr)
    return bar.update, lambda message: bar.write(message, file=sys.stderr), bar.close


def _display_names(paths: list[Path], inputs: list[Path]) -> dict[Path, Path]:
    """Each image's path relative to the folder it was found in (a file given directly: its name)."""
    names: dict[Path, Path] = {}
    for path in paths:
        folder = next((item for item in inputs if item.is_dir() and path.is_relative_to(item)), None)
        names[path] = path.relative_to(folder) if folder is not None else Path(path.name)
    return names


def _overlay_paths(names: dict[Path, Path], folder: Path) -> dict[Path, Path]:
    """``folder/<relative parent>/<stem>_overlay.png``, numbered when two images share a stem."""
    taken: set[Path] = set()
    result = {}
    for path, name in names.items():
        candidate = folder / name.parent / f"{name.stem}_overlay.png"
        index = 1
        while candidate in taken:
            candidate = folder / name.parent / f"{name.stem}_{index}_overlay.png"
            index += 1
        taken.add(candidate)
        result[path] = candidate
    return result


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _record(path: Path, prediction: Prediction, model: EdgeModel, overlay: Path | None) -> dict[str, Any]:
    finite = math.isfinite(prediction.score)
    return {"path": str(path), "score": prediction.score if finite else None, "label": prediction.label,
            "threshold": model.threshold.value, "threshold_source": model.threshold.source,
            "reason": prediction.reason, "overlay": str(overlay) if overlay else None}


def predict_images(model: EdgeModel, inputs: list[Path], out: Path, batch_size: int = 1, overlays: bool = True,
                   stream: TextIO = sys.stderr) -> dict[str, Any]:
    """Score every image of ``inputs`` with ``model``; write CSV rows as they come, overlays, then the JSON summary.

    Returns the summary written to ``out/results.json``: model description, ``results`` and ``skipped``.
    """
    paths = find_images(inputs)
    out.mkdir(parents=True, exist_ok=True)
    names = _display_names(paths, inputs)
    overlay_paths = _overlay_paths(names, out / "overlays") if overlays else {}
    summary: dict[str, Any] = {**model.describe(), "images": len(paths), "results": [], "skipped": [],
                               "complete": False}
    advance, warn, close = _progress(len(paths))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        try:
            for chunk in _batches(paths, batch_size):
                loaded: list[tuple[Path, np.ndarray]] = []
                for path in chunk:
                    try:
                        loaded.append((path, read_image(path)))
                    except ImageReadError as error:
                        warn(f"warning: skipped {path}: {error.__cause__ or error}")
                        summary["skipped"].append({"path": str(path), "error": str(error)})
                for group in _same_size_groups(loaded, model.input_size):
                    inputs_batch = [resize_image(image, model.input_size) if model.input_size else image
                                    for _, image in group]
                    for (path, image), prediction in zip(group, model.predict(inputs_batch), strict=True):
                        overlay = overlay_paths.get(path)
                        if overlay is not None:
                            save_overlay(overlay, image, prediction.anomaly_map, prediction.mask)
                        record = _record(path, prediction, model, overlay)
                        summary["results"].append(record)
                        writer.writerow({**record, "score": prediction.score, "overlay": record["overlay"] or ""})
                        csv_file.flush()
                advance(len(chunk))
            summary["complete"] = True
        finally:
            close()
            (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    flagged = sum(record["label"] for record in summary["results"])
    print(f"{len(summary['results'])} images scored, {flagged} anomalous (threshold {model.threshold.value:g}, "
          f"{model.threshold.source}); results in {out}", file=stream)
    if summary["skipped"]:
        print(f"{len(summary['skipped'])} skipped:", file=stream)
        for item in summary["skipped"]:
            print(f"  {item['path']}", file=stream)
    return summary


def _same_size_groups(loaded: list[tuple[Path, np.ndarray]],
                      input_size: tuple[int, int] | None) -> list[list[tuple[Path, np.ndarray]]]:
    """All of ``loaded`` in one group when the model resizes to a static size, else groups of equal H×W."""
    if input_size is not None or not loaded:
        return [loaded] if loaded else []
    groups: dict[tuple[int, ...], list[tuple[Path, np.ndarray]]] = {}
    for item in loaded:
        groups.setdefault(item[1].shape, []).append(item)
    return list(groups.values())


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flowad-predict``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be a positive integer; got {args.batch_size}")
    try:
        model = EdgeModel(args.model, device=args.device, precision=args.precision, num_threads=args.num_threads)
        model.threshold = choose_threshold(model.metadata, args.threshold)
        summary = predict_images(model, args.images, args.out, args.batch_size, overlays=not args.no_overlays)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return 0 if summary["results"] or not summary["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
