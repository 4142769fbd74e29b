r"""How much of a category's pixel AUROC and AUPRO a map earns without finding the defect.

Both metrics pool the pixels of all test images. When every defect lies on the part's textured area and the
background is plain (tire: defects on the tread), a map that is merely high on that area scores well. For each
model checkpoint this measures, on the category's **test** split (an analysis, never a selection):

- ``model map``: the model's anomaly map, what the test metrics score;
- ``position prior``: the mean of that model's maps over the normal training images, the *same* map for every test
  image: it knows where the part usually is, nothing of the image;
- ``model map, per-position z``: the model's map standardised per position with its normal-training mean and
  standard deviation (what ``position_score`` does for the image score);
and once, without a model, ``part texture``: ``local_defects.part_score`` of the test image (distance from the
border colour + local contrast): it sees the image, but no normal data and nothing of defects.

Writes ``benchmarks/results/<category>/map_prior.{json,md}``::

    OMP_NUM_THREADS=2 python benchmarks/map_prior.py --category tire \
        --checkpoint CflowAD=DIR/CflowAD_tire.ckpt FastFlow=DIR/FastFlow_tire.ckpt CSFlow=DIR/CSFlow_tire.ckpt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from anomalib.metrics.aupro import _AUPRO
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.machine import cpu_model
from lightning.pytorch import seed_everything
from select_image_score import RESULTS, datamodule, load_selection_checkpoint, model_inputs, shipped_model

from flowad_plugins.data.local_defects import part_score
from flowad_plugins.position_statistics import ScoreMapStatistics

METRIC_SIZE = 256  # maps and masks are area-averaged / nearest-resized to this side before the metrics


def _small(maps: torch.Tensor) -> torch.Tensor:
    """``N×H×W`` maps at ``METRIC_SIZE``² (area average)."""
    return F.interpolate(maps[:, None].float(), size=(METRIC_SIZE, METRIC_SIZE), mode="area")[:, 0]


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Pixel AUROC and AUPRO (FPR ≤ 0.3, anomalib's) of ``N×S×S`` maps against ``N×S×S`` boolean masks."""
    aupro = _AUPRO(fpr_limit=0.3)
    aupro.update(maps, masks.int())
    return {"pixel_AUROC": round(float(binary_auroc(maps.flatten(), masks.flatten().int())), 4),
            "pixel_AUPRO": round(float(aupro.compute()), 4)}


@torch.no_grad()
def model_maps(model, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(maps, masks, images)`` at ``METRIC_SIZE``²: the model's anomaly maps, the masks and the input images."""
    maps, masks, images = [], [], []
    model.eval()
    for batch in loader:
        inputs = model_inputs(model, batch.image)
        output = model.model(inputs)
        maps.append(_small(output.anomaly_map.reshape(len(inputs), *output.anomaly_map.shape[-2:])))
        mask = batch.gt_mask.float().reshape(len(inputs), 1, *batch.gt_mask.shape[-2:])
        masks.append(F.interpolate(mask, size=(METRIC_SIZE, METRIC_SIZE), mode="nearest")[:, 0] > 0.5)
        images.append(F.interpolate(batch.image.float(), size=(METRIC_SIZE, METRIC_SIZE), mode="area"))
    return torch.cat(maps), torch.cat(masks), torch.cat(images)


def analyse(name: str, checkpoint: Path, category: str, batch_size: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    seed_everything(0, workers=True)  # the same validation split as the selection scripts
    model, _ = shipped_model(name)
    load_selection_checkpoint(model, checkpoint)
    data = datamodule(category, batch_size)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    train_maps, _, _ = model_maps(model, data.train_dataloader())
    maps, masks, images = model_maps(model, data.test_dataloader())
    statistics = ScoreMapStatistics()
    statistics.fit([train_maps])
    prior = statistics.map_mean.expand_as(maps)
    row = {"model": name, "category": category,
           "model map": pixel_metrics(maps, masks),
           "position prior": pixel_metrics(prior.contiguous(), masks),
           "model map, per-position z": pixel_metrics(statistics.standardise(maps[:, None])[:, 0], masks)}
    return row, masks, images


def markdown(rows: list[dict], texture: dict, category: str, command: str) -> str:
    lines = [f"# What a {category} map earns without finding the defect (test split, analysis only)", "",
             f"`{command}`; machine: {cpu_model()}. Pixel AUROC / AUPRO (FPR ≤ 0.3) at {METRIC_SIZE} px.", "",
             "| map | " + " | ".join(row["model"] for row in rows) + " |", "|---|" + "---|" * len(rows)]
    for kind in ("model map", "position prior", "model map, per-position z"):
        lines.append(f"| {kind} | " + " | ".join(
            f"{row[kind]['pixel_AUROC']:.3f} / {row[kind]['pixel_AUPRO']:.3f}" for row in rows) + " |")
    lines.append(f"| part texture (no model) | {texture['pixel_AUROC']:.3f} / {texture['pixel_AUPRO']:.3f} |"
                 + " |" * (len(rows) - 1))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="tire", choices=["bottle", "tire", "generated"])
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="MODEL=CKPT")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    rows, texture = [], None
    for name, path in checkpoints.items():
        print(f"== {name} on {args.category} (test split)", flush=True)
        row, masks, images = analyse(name, Path(path), args.category, args.batch_size)
        rows.append(row)
        if texture is None:
            texture = pixel_metrics(torch.stack([part_score(image) for image in images]), masks)
    command = (f"python benchmarks/map_prior.py --category {args.category} --checkpoint "
               + " ".join(f"{name}=DIR/{name}_{args.category}.ckpt" for name in checkpoints))
    out = RESULTS / args.category / "map_prior"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": cpu_model(), "rows": rows,
                                                    "part texture": texture}, indent=1) + "\n")
    text = markdown(rows, texture, args.category, command)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
