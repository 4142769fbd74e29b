"""CS-Flow: does a per-position log-det term in the map help? Decided on the small-defect validation only.

CS-Flow's maps are ``−‖z_l‖²/(2C)`` per position: the log-det of its coupling blocks enters the loss per image
only. Each coupling block scales every element by ``exp(σ(s))``, so the sum of ``σ(s)`` over the channels of a
position is a per-position log-det, as CFLOW and FastFlow use in their maps. This script scores trained CS-Flow
checkpoints (``local_defect_validation.py --save-checkpoints DIR``) with both maps, each scale standardised with the
mean and standard deviation of its values on the normal training images, upsampled, averaged over scales and
smoothed with the model's ``blur_sigma``; the image score standardises that map per position (as the shipped score
does) and takes the maximum after the model's ``score_blur_sigma``. Validation: the held-out normal images and
their local defects (``local_defect_validation.local_defect_batches``); the test split is never read.

    python benchmarks/archive/csflow_log_det_map.py --checkpoints DIR \
        --out benchmarks/results/csflow_log_det_map.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.machine import cpu_model
from local_defect_validation import local_defect_batches, prepared_model
from select_image_score import model_inputs, pixel_auroc, position_standardised, smoothed

from flowad_plugins.flows.cross_scale import soft_clamp

MAPS = ("z_only", "with_log_det")


def half_step(params: list[torch.Tensor], targets: list[torch.Tensor], log_det: list[torch.Tensor],
              clamp_alpha: float) -> list[torch.Tensor]:
    """One affine half-step of a coupling block; adds ``Σ_c σ(s)`` to ``log_det`` (per scale, in place)."""
    outputs = []
    for scale, (values, target) in enumerate(zip(params, targets, strict=True)):
        log_scale, shift = values.chunk(2, dim=1)
        log_scale = soft_clamp(log_scale, clamp_alpha)
        outputs.append(target * torch.exp(log_scale) + shift)
        log_det[scale] += log_scale.sum(dim=1)
    return outputs


@torch.no_grad()
def latents_and_position_log_det(flow, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The flow's latents ``[B×C×h_l×w_l]`` and, per scale, the log-det of its coupling blocks per position
    ``[B×h_l×w_l]`` (``Σ_c σ(s)`` over every block; ActNorm's is the same at every position and left out)."""
    values = list(features)
    if flow.input_norm is not None:
        values, _ = flow.input_norm(values)
    log_det = [torch.zeros(x.shape[0], *x.shape[-2:]) for x in values]
    for permutation, block in zip(flow.permutations, flow.blocks, strict=True):
        values = [x[:, permutation] for x in values]
        first, second = [x[:, : block.split] for x in values], [x[:, block.split :] for x in values]
        first = half_step(block.subnet_a(second), first, log_det, block.clamp_alpha)
        second = half_step(block.subnet_b(first), second, log_det, block.clamp_alpha)
        values = [torch.cat(pair, dim=1) for pair in zip(first, second, strict=True)]
    return values, log_det


@torch.no_grad()
def scale_maps(model, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per map kind, per scale: log-likelihood maps ``B×h_l×w_l`` (higher = more normal)."""
    inputs = model_inputs(model, images)
    latents, log_det = latents_and_position_log_det(model.model.flow, model.model.features(inputs))
    reference, _ = model.model.flow(model.model.features(inputs))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(latents, reference, strict=True))
    channels = latents[0].shape[1]
    squared = [z.pow(2).sum(dim=1) for z in latents]
    return {"z_only": [-0.5 * s / channels for s in squared],
            "with_log_det": [(d - 0.5 * s) / channels for d, s in zip(log_det, squared, strict=True)]}


def combined(maps: list[list[torch.Tensor]], mean: list[float], std: list[float],
             size: tuple[int, int]) -> torch.Tensor:
    """``N×H×W`` anomaly maps: each scale standardised, negated, upsampled bilinearly, averaged over scales."""
    scales = []
    for scale in range(len(mean)):
        values = torch.cat([batch[scale] for batch in maps])
        z = -(values - mean[scale]) / std[scale]
        scales.append(F.interpolate(z[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(scales).mean(dim=0)


def evaluate(name: str, category: str, checkpoints: Path, batch_size: int) -> dict:
    model, data, _ = prepared_model(name, category, {}, checkpoints, 0.0, batch_size)
    model.eval()
    train = {kind: [] for kind in MAPS}
    for batch in data.train_dataloader():
        for kind, values in scale_maps(model, batch.image).items():
            train[kind].append(values)
    val = {kind: [] for kind in MAPS}
    labels, masks = [], []
    for batch in local_defect_batches(data, batch_size):
        for kind, values in scale_maps(model, batch.image).items():
            val[kind].append(values)
        labels.append(batch.gt_label)
        masks.append(batch.gt_mask)
    labels, masks = torch.cat(labels), torch.cat(masks)
    size = tuple(model_inputs(model, batch.image[:1]).shape[-2:])
    masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    scorer = model.model.scorer
    row = {"model": name, "category": category, "val_images": {"normal": int((labels == 0).sum()),
                                                                "anomalous": int((labels == 1).sum())}}
    for kind in MAPS:
        per_scale = [torch.cat([batch[s] for batch in train[kind]]) for s in range(len(train[kind][0]))]
        mean = [float(v.mean()) for v in per_scale]
        std = [float(v.std()) for v in per_scale]
        train_maps = combined(train[kind], mean, std, size)
        val_maps = combined(val[kind], mean, std, size)
        _, standardised = position_standardised(train_maps, val_maps)
        score = smoothed(standardised, scorer.score_blur_sigma).flatten(1).amax(dim=1)
        row[kind] = {"image_AUROC": round(float(binary_auroc(score, labels.int())), 4),
                     "pixel_AUROC": pixel_auroc(smoothed(val_maps, scorer.blur_sigma), masks)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, required=True, help="DIR/CSFlow_<category>.ckpt")
    parser.add_argument("--categories", nargs="+", default=["bottle", "tire", "generated"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [evaluate("CSFlow", category, args.checkpoints, args.batch_size) for category in args.categories]
    for row in rows:
        print(row["category"], {kind: row[kind] for kind in MAPS})
    shown = ["DIR" if a == str(args.checkpoints) else a for a in sys.argv[1:]]  # a local folder: not in the result
    command = shlex.join(["python", "benchmarks/archive/csflow_log_det_map.py", *shown])
    args.out.write_text(json.dumps({"machine": cpu_model(), "command": command, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
