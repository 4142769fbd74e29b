r"""Anomaly maps of trained checkpoints on the same defective test images of a category (PNG, one row per model).

Loads ``DIR/<model>_<category>.ckpt`` (written by ``decisions.py --save-checkpoints``), runs it on ``--count``
defective test images spread over the category's defect types, saves the maps as ``.npz`` in the format of
``evaluate.py --save-maps`` and draws them with ``maps_figure.build_figure``. A picture only: every metric comes
from the result files.

    python benchmarks/checkpoint_maps.py --category tire --checkpoint CflowAD=DIR FastFlow=DIR CSFlow=DIR2 \
        --out benchmarks/results/tire/anomaly_maps.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from tempfile import mkdtemp

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import maps_figure
from harness.datasets import validation_split_datamodule
from harness.models import load_checkpoint

STEMS = {"CflowAD": "cflow_ad", "FastFlow": "fastflow", "CSFlow": "csflow"}


@torch.no_grad()
def save_maps(name: str, checkpoint: Path, category: str, count: int, out: Path) -> None:
    model = load_checkpoint(name, checkpoint).eval()
    data = validation_split_datamodule(category, 8)
    data.prepare_data()
    data.setup("test")
    defective = [index for index in range(len(data.test_data)) if int(data.test_data[index].gt_label) == 1]
    chosen = [defective[int(i)] for i in np.linspace(0, len(defective) - 1, count)]
    items = [data.test_data[index] for index in chosen]
    images = torch.stack([item.image.as_subclass(torch.Tensor) for item in items])
    maps = model.model(model.pre_processor(images)).anomaly_map
    maps = torch.nn.functional.interpolate(maps.reshape(len(images), 1, *maps.shape[-2:]), size=images.shape[-2:],
                                           mode="bilinear", align_corners=False)[:, 0]
    folders = [Path(item.image_path).parent for item in items]  # <defect>/ or, in MVTec 3D-AD, <defect>/rgb/
    names = [folder.parent.name if folder.name == "rgb" else folder.name for folder in folders]
    masks = torch.stack([item.gt_mask.as_subclass(torch.Tensor).reshape(images.shape[-2:]) for item in items])
    np.savez_compressed(out / f"{STEMS[name]}.npz", images=images.numpy(), maps=maps.numpy(),
                        masks=masks.numpy() > 0, names=np.array(names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="tire", choices=["bottle", "tire", "generated"])
    parser.add_argument("--checkpoint", nargs="+", required=True, help="Model=DIR (DIR/<Model>_<category>.ckpt)")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folder = Path(mkdtemp())
    for entry in args.checkpoint:
        name, directory = entry.split("=", 1)
        save_maps(name, Path(directory) / f"{name}_{args.category}.ckpt", args.category, args.count, folder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), maps_figure.build_figure(folder))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
