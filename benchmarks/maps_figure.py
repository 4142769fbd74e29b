"""Anomaly maps of every model on the same defective bottle test images, one row per model (PNG).

Reads the ``.npz`` files ``benchmarks/evaluate.py --save-maps`` wrote (post-processed maps: 0.5 = the model's
threshold) and writes one grid: a row per model, a column per image; each cell is the map over the image
(jet colour map) with the ground-truth outline in white. The post-processed maps squeeze values far from the
threshold towards 0 and 1, so each row's colours are stretched between that row's minimum and maximum over the
shown images (display only: the ranking of pixels, and hence every metric, is unchanged).

    python benchmarks/maps_figure.py   # results/bottle/maps/*.npz -> results/bottle/anomaly_maps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bottle"
ROWS = [
    ("CflowAD (ours)", "cflow_ad"),
    ("FastFlow (ours)", "fastflow"),
    ("CSFlow (ours)", "csflow"),
    ("anomalib Cflow", "anomalib_cflow"),
    ("anomalib Fastflow", "anomalib_fastflow"),
    ("anomalib Csflow", "anomalib_csflow"),
]
CELL = 160
LABEL_WIDTH = 170


def _to_bgr(image: np.ndarray) -> np.ndarray:
    """``3×H×W`` float RGB in [0, 1] → ``CELL×CELL×3`` uint8 BGR."""
    rgb = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    return cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (CELL, CELL), interpolation=cv2.INTER_AREA)


def _cell(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Overlay of the map (fixed [0, 1] scale) on the image, with the ground-truth outline."""
    base = _to_bgr(image)
    heat = cv2.resize((np.clip(anomaly_map, 0, 1) * 255).astype(np.uint8), (CELL, CELL))
    overlay = cv2.addWeighted(base, 0.45, cv2.applyColorMap(heat, cv2.COLORMAP_JET), 0.55, 0)
    outline = cv2.resize(mask.astype(np.uint8), (CELL, CELL), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(overlay, contours, -1, (255, 255, 255), 1)
    return overlay


def _label(text: str, height: int, width: int = LABEL_WIDTH) -> np.ndarray:
    panel = np.full((height, width, 3), 255, np.uint8)
    lines = text.split("\n")
    top = height // 2 + 5 - 9 * (len(lines) - 1)
    for line_number, line in enumerate(lines):
        cv2.putText(panel, line, (6, top + 18 * line_number), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def build_figure(folder: Path) -> np.ndarray:
    """The grid as a BGR image: a header row of input images, then one row per model found in ``folder``."""
    rows: list[np.ndarray] = []
    header_done = False
    for title, stem in ROWS:
        path = folder / f"{stem}.npz"
        if not path.is_file():
            continue
        data = np.load(path)
        if not header_done:
            inputs = [_to_bgr(image) for image in data["images"]]
            rows.append(np.hstack([_label("input", CELL), *inputs]))
            names = [str(name).split("/")[0] for name in data["names"]]
            rows.append(np.hstack([_label("", 24), *[_label(name, 24, CELL) for name in names]]))
            header_done = True
        maps = data["maps"]
        maps = (maps - maps.min()) / max(float(maps.max() - maps.min()), 1e-12)  # display stretch per row
        cells = [_cell(image, anomaly_map, mask)
                 for image, anomaly_map, mask in zip(data["images"], maps, data["masks"], strict=True)]
        rows.append(np.hstack([_label(title.replace(" (", "\n("), CELL), *cells]))
    if not rows:
        msg = f"No map files (*.npz from benchmarks/evaluate.py --save-maps) in {folder}."
        raise FileNotFoundError(msg)
    return np.vstack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=Path, default=RESULTS / "maps")
    parser.add_argument("--out", type=Path, default=RESULTS / "anomaly_maps.png")
    args = parser.parse_args()
    cv2.imwrite(str(args.out), build_figure(args.maps))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
