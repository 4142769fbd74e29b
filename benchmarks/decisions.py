r"""Decisions at the shipped thresholds, and how they move under small drift; the image-score choice on validation.

For each row (a shipped config, or anomalib's Cflow on the same backbone, layers and budget) and category, one model
is trained (validation = 20 % of train/good + anomalib's synthetic anomalies, seed 0; never the test set), then:

- **validation study** (ours only; the evidence for the score and threshold defaults): the held-out normal images
  that anomalib turned into synthetic anomalies are normal images no threshold saw ("unseen normals"); each also gets
  every kind of local defect (``benchmarks/harness/local_defects.py``). Every image-score variant
  (``harness/drift.py``: per-position std shrinkage ``λ`` and map jitter, the other aggregation's plain maximum, the
  maximum without a border) is scored from the same forward passes,
  clean and under drift (±2/255 brightness, ±8 px shift in the model's input frame, bf16 backbone), with its
  thresholds set as the post-processor sets them: image AUROC, false-alarm rate and F1 at the false-alarm-rate
  threshold and at the F1-optimal threshold on anomalib's synthetic anomalies;
- **test read-out** of the shipped model through its own post-processor (what a checkpoint and IR ship): image F1,
  false-alarm rate, flagged defects, pixel F1, share of normal images with any mask pixel, median normalised scores,
  and the same under drift.

Writes ``--out``.json (rows) and ``--out``.md (tables)::

    OMP_NUM_THREADS=2 python benchmarks/decisions.py --rows cflow_ad fastflow csflow anomalib_cflow \
        --categories bottle tire generated --max-minutes 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from tempfile import mkdtemp

import numpy as np
import torch
import yaml
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.datasets import validation_split_datamodule
from harness.drift import (
    CONDITIONS,
    RandomReflectShift,
    autocast_for,
    drifted,
    maps_by_aggregation,
    margin_scores,
    other_aggregation,
    score_maps,
    variant_scores,
    variant_statistics,
)
from harness.local_defects import KINDS, add_local_defect
from harness.machine import cpu_model
from harness.models import build_model, default_input_side, load_checkpoint

from flowad_plugins.post_processing.thresholds import DEFAULT_IMAGE_FPR, level_threshold_report

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "cflow_ad": ("configs/cflow_ad_efficientnet_lite0.yaml", None),
    "fastflow": ("configs/fastflow_efficientnet_lite0.yaml", None),
    "csflow": ("configs/csflow_efficientnet_lite0.yaml", None),
    "anomalib_cflow": (None, ("anomalib.Cflow", {"backbone": "efficientnet_lite0",
                                                 "layers": ["blocks.2", "blocks.4"]})),
    "anomalib_fastflow": (None, ("anomalib.Fastflow", {"backbone": "efficientnet_lite0"})),
}
ANOMALIB_EPOCHS = 10
def decisions(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    flagged = scores > threshold
    normal, defective = labels == 0, labels == 1
    true_positive = int((flagged & defective).sum())
    precision = true_positive / max(int(flagged.sum()), 1)
    recall = true_positive / max(int(defective.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": round(f1, 4), "false_alarm_rate": round(float(flagged[normal].mean()), 4) if normal.any() else None,
            "flagged_defects": f"{true_positive}/{int(defective.sum())}",
            "flagged_normals": f"{int((flagged & normal).sum())}/{int(normal.sum())}"}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    return round(float(binary_auroc(torch.as_tensor(scores), torch.as_tensor(labels))), 4)


def validation_images(data) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """(normal validation images the thresholds see, unseen held-out normal images, their paths)."""
    seen = {str(p) for p, label in zip(data.val_data.samples.image_path, data.val_data.samples.label_index,
                                      strict=True) if int(label) == 0}
    held_out = sorted(str(p) for p in data.val_data.source_samples.image_path)
    unseen = [p for p in held_out if p not in seen]
    return ([read_image(p, as_tensor=True) for p in sorted(seen)], [read_image(p, as_tensor=True) for p in unseen],
            unseen)


def with_local_defects(normals: list[torch.Tensor]) -> tuple[list[torch.Tensor], np.ndarray, torch.Tensor]:
    """Each normal image as is and with each kind of local defect: (images, labels, masks ``N×H×W``)."""
    rng = np.random.default_rng(0)
    images, labels, masks = [], [], []
    for index, image in enumerate(normals):
        images.append(image)
        labels.append(0)
        masks.append(torch.zeros(image.shape[-2:], dtype=torch.bool))
        for kind in KINDS:
            defective, mask = add_local_defect(image, normals[(index + 1) % len(normals)], rng, kind)
            images.append(defective)
            labels.append(1)
            masks.append(mask.bool())
    return images, np.asarray(labels), torch.stack(masks)


@torch.no_grad()
def anomaly_maps(model, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw image scores ``N``, raw anomaly maps ``N×H×W`` at the images' own size) of the shipped model."""
    scores, maps = [], []
    for batch in batched(images):
        prediction = model.model(model.pre_processor(batch))
        scores.append(prediction.pred_score.float())
        maps.append(F.interpolate(prediction.anomaly_map.float().reshape(len(batch), 1, *prediction.anomaly_map
                                                                          .shape[-2:]),
                                  size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(scores), torch.cat(maps)


def pixel_f1(maps: torch.Tensor, masks: torch.Tensor, threshold: float, flagged: torch.Tensor) -> float:
    """F1 of ``maps > threshold`` on images ``flagged`` (masks only on images labelled anomalous)."""
    predicted = (maps > threshold) & flagged.reshape(-1, 1, 1)
    true_positive = int((predicted & masks).sum())
    return round(2 * true_positive / max(int(predicted.sum()) + int(masks.sum()), 1), 4)


def pixel_rules(model, seen: list[torch.Tensor], synthetic: list, images: list[torch.Tensor],
                masks: torch.Tensor) -> dict:
    """Pixel F1 on unseen normals + local defects at each pixel-threshold rule (masks gated by the shipped labels)."""
    from flowad_plugins.post_processing.thresholds import DEFAULT_PIXEL_FPR, false_alarm_threshold

    _, seen_maps = anomaly_maps(model, seen)
    _, synthetic_maps = anomaly_maps(model, [item.image for item in synthetic])
    synthetic_masks = torch.stack([item.gt_mask.bool().reshape(item.image.shape[-2:]) for item in synthetic])
    values = torch.cat([seen_maps.flatten(), synthetic_maps.flatten()]).numpy()
    truth = torch.cat([torch.zeros(seen_maps.numel()), synthetic_masks.flatten().float()]).numpy()
    rules = {"f1_synthetic": _f1_optimal(values, truth),
             "fpr_0.001": false_alarm_threshold(seen_maps, DEFAULT_PIXEL_FPR)[0],
             "fpr_0.01": false_alarm_threshold(seen_maps, 0.01)[0]}
    threshold = float(model.post_processor.image_threshold)
    scores, maps = anomaly_maps(model, images)
    flagged = scores > threshold
    return {name: pixel_f1(maps, masks, value, flagged) for name, value in rules.items()}


def batched(images: list[torch.Tensor], size: int = 8):
    for start in range(0, len(images), size):
        yield torch.stack(images[start:start + size])


def validation_study(model, data) -> dict:
    """Every score variant, clean and drifted, on unseen normals + local defects, thresholds as shipped."""
    pre = model.pre_processor
    train_maps = torch.cat([score_maps(model, pre(batch.image), "clean") for batch in data.train_dataloader()])
    statistics = variant_statistics(train_maps)
    del train_maps
    seen, unseen, _ = validation_images(data)
    seen_scores = {k: v.numpy() for k, v in _scores(model, seen, "clean", statistics).items()}
    synthetic = [item.image for item in data.val_data if int(item.gt_label) == 1]
    synthetic_scores = {k: v.numpy() for k, v in _scores(model, synthetic, "clean", statistics).items()}
    images, labels, masks = with_local_defects(unseen)
    result = {"images": {"threshold_normals": len(seen), "synthetic": len(synthetic), "unseen_normals": len(unseen),
                         "local_defects": int(labels.sum())}, "variants": {}}
    result["pixel_f1"] = pixel_rules(model, seen, [item for item in data.val_data if int(item.gt_label) == 1],
                                     images, masks)
    per_condition = {condition: {k: v.numpy() for k, v in _scores(model, images, condition, statistics).items()}
                     for condition in CONDITIONS}
    for name in seen_scores:
        threshold = level_threshold_report("image", torch.as_tensor(seen_scores[name]), None, DEFAULT_IMAGE_FPR,
                                           None, len(seen))["raw_threshold"]
        f1_threshold = _f1_optimal(np.concatenate([seen_scores[name], synthetic_scores[name]]),
                                   np.r_[np.zeros(len(seen)), np.ones(len(synthetic))])
        rows = {}
        for condition in CONDITIONS:
            scores = per_condition[condition][name]
            rows[condition] = {"auroc": auroc(scores, labels), "fpr_rule": decisions(scores, labels, threshold),
                               "f1_rule": decisions(scores, labels, f1_threshold)}
        result["variants"][name] = rows
    return result


def _scores(model, images: list[torch.Tensor], condition: str, statistics: dict) -> dict[str, torch.Tensor]:
    """Every variant's image scores of ``images`` under ``condition``: the per-position variants of the shipped
    map, and the plain maximum of the map the other aggregation combines."""
    other = other_aggregation(model)
    parts = []
    for batch in batched(images):
        maps = maps_by_aggregation(model, drifted(batch, condition, model.pre_processor), condition)
        shipped = maps[model.model.scorer.aggregation]
        part = variant_scores(model, shipped, statistics)
        part |= variant_scores(model, maps[other], {f"plain_max_{other}": None})
        part |= margin_scores(model, shipped)
        parts.append(part)
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _f1_optimal(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (flag ``score > threshold``) of the highest F1 of ``labels`` (1 = anomalous)."""
    order = np.argsort(-scores, kind="stable")
    ordered, positive = scores[order], labels[order] == 1
    true_positives, flagged = np.cumsum(positive), np.arange(1, len(scores) + 1)
    last_of_ties = np.r_[ordered[1:] != ordered[:-1], True]  # a cut can only fall between different scores
    f1 = np.where(last_of_ties, 2 * true_positives / (flagged + positive.sum()), -1.0)
    return float(ordered[int(np.argmax(f1))]) - 1e-9


@torch.no_grad()
def test_readout(model, data, ours: bool) -> dict:
    """The shipped model through its own post-processor on the test split, clean and drifted."""
    dataset = data.test_data
    items = [dataset[i] for i in range(len(dataset))]
    labels = np.asarray([int(item.gt_label) for item in items])
    masks = torch.stack([item.gt_mask.bool().reshape(item.image.shape[-2:]) if item.gt_mask is not None
                         else torch.zeros(item.image.shape[-2:], dtype=torch.bool) for item in items])
    post = model.post_processor
    result = {}
    for condition in CONDITIONS if ours else CONDITIONS[:-1]:
        raw, outputs = [], []
        for start in range(0, len(items), 8):
            images = torch.stack([item.image for item in items[start:start + 8]])
            inputs = drifted(images, condition, model.pre_processor)
            with autocast_for(condition):
                prediction = model.model(inputs)
            raw.append(prediction.pred_score.float().reshape(-1))
            processed = post(prediction)
            outputs.append((processed.pred_score.float(), processed.pred_label, processed.pred_mask, images.shape))
        raw_scores = torch.cat(raw).numpy()
        labels_at_threshold = torch.cat([o[1].reshape(-1) for o in outputs]).numpy().astype(bool)
        normalised = torch.cat([o[0].reshape(-1) for o in outputs]).numpy()
        row = {"image_auroc": auroc(raw_scores, labels),
               **decisions(normalised, labels, 0.5),
               "median_score_normal": round(float(np.median(normalised[labels == 0])), 3),
               "median_score_defective": round(float(np.median(normalised[labels == 1])), 3)}
        assert (labels_at_threshold == (normalised > 0.5)).all()
        if condition == "clean":
            predicted = torch.cat([F.interpolate(o[2].reshape(len(o[2]), 1, *o[2].shape[-2:]).float(),
                                                 size=o[3][-2:], mode="nearest")[:, 0] for o in outputs]).bool()
            true_positive = int((predicted & masks).sum())
            pixel_f1 = 2 * true_positive / max(int(predicted.sum()) + int(masks.sum()), 1)
            row.update(pixel_f1=round(pixel_f1, 4), pixel_f1_fpr_rule=_test_pixel_fpr_rule(model, data, items, masks)
                       if ours else None,
                       normal_images_with_mask=round(float(predicted[labels == 0].flatten(1).any(1).float().mean()),
                                                     4),
                       threshold_report={k: v for k, v in getattr(post, "threshold_report", {}).items()})
        result[condition] = row
    return result


def _test_pixel_fpr_rule(model, data, items: list, masks: torch.Tensor) -> float:
    """Test pixel F1 with the pixel threshold at a 0.1 % false-alarm rate of the normal validation pixels."""
    from flowad_plugins.post_processing.thresholds import DEFAULT_PIXEL_FPR, false_alarm_threshold

    seen, _, _ = validation_images(data)
    threshold = false_alarm_threshold(anomaly_maps(model, seen)[1], DEFAULT_PIXEL_FPR)[0]
    scores, maps = anomaly_maps(model, [item.image for item in items])
    return pixel_f1(maps, masks, threshold, scores > float(model.post_processor.image_threshold))


def trained(row: str, category: str, max_minutes: float, batch_size: int, save_to: Path | None = None,
            load_from: Path | None = None, train_shift: int = 0):
    seed_everything(0, workers=True)
    config, anomalib_model = ROWS[row]
    if config is not None:
        loaded = yaml.safe_load((REPO / config).read_text())
        name = loaded["model"]["class_path"].rsplit(".", 1)[-1]
        init, epochs = dict(loaded["model"]["init_args"]), int(loaded["trainer"]["max_epochs"])
    else:
        (name, init), epochs = anomalib_model, ANOMALIB_EPOCHS
    data = validation_split_datamodule(category, batch_size)
    if train_shift:
        data.train_augmentations = RandomReflectShift(train_shift)
    if load_from is not None and config is not None:  # a checkpoint this script saved: the same split, no training
        model = load_checkpoint(name, load_from / f"{name}_{category}.ckpt", weights_only=False)
        data.setup("fit")
        data.setup("test")
        return model.eval(), data, {"epochs_run": None, "epochs": epochs, "train_seconds": None,
                                    "checkpoint": f"{name}_{category}.ckpt"}
    model = build_model(name, init, default_input_side(name), keep_anomalib_post_processor=config is None)
    engine = Engine(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    default_root_dir=Path(mkdtemp()), max_time={"minutes": max_minutes})
    start = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    info = {"epochs_run": engine.trainer.current_epoch, "epochs": epochs, "train_shift": train_shift,
            "train_seconds": round(time.perf_counter() - start, 1)}
    if save_to is not None:
        save_to.mkdir(parents=True, exist_ok=True)
        if config is not None:
            engine.trainer.save_checkpoint(save_to / f"{name}_{category}.ckpt")
        else:  # anomalib's classes do not reload offline (timm would fetch weights): its build and its state
            torch.save({"name": name, "init": init, "state_dict": model.state_dict()},
                       save_to / f"{name}_{category}.pt")
    data.setup("test")
    return model.eval(), data, info


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def markdown(results: dict) -> str:
    """The test tables (shipped thresholds, drift) and the validation study, from ``results``."""
    order = {**{name: index for index, name in enumerate(ROWS)}}
    rows = sorted(results["rows"], key=lambda row: (row["category"] != "bottle", row["category"], order[row["row"]]))
    lines = ["# Decisions at the shipped thresholds, and under small drift", "",
             f"`python benchmarks/decisions.py` (each row's command is in `decisions.json`); machine: "
             f"{results['machine']}. Validation = 20 % of train/good + anomalib's synthetic anomalies (seed 0); "
             "the test split is read once, through each model's own post-processor (what the checkpoint and IR ship).",
             "", "## Test, at the shipped thresholds", "",
             "| category | model | epochs | image AUROC | image F1 | false-alarm rate | defects flagged | pixel F1 | "
             "normal images with a mask | median score normal / defective |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        clean = row["test"]["clean"]
        lines.append(f"| {row['category']} | {row['row']} | {row['epochs_run']} | {clean['image_auroc']:.3f} | "
                     f"{clean['f1']:.3f} | {clean['false_alarm_rate']:.2f} | {clean['flagged_defects']} | "
                     f"{clean['pixel_f1']:.3f} | {clean['normal_images_with_mask']:.2f} | "
                     f"{clean['median_score_normal']:.2f} / {clean['median_score_defective']:.2f} |")
    lines += ["", "## Test, under drift: change of false-alarm rate (points) and image AUROC against clean", "",
              "| category | model | " + " | ".join(CONDITIONS[1:]) + " |", "|---|---|" + "---|" * (len(CONDITIONS) - 1)]
    for row in rows:
        clean = row["test"]["clean"]
        cells = []
        for condition in CONDITIONS[1:]:
            drift = row["test"].get(condition)
            cells.append("–" if drift is None else
                         f"{100 * (drift['false_alarm_rate'] - clean['false_alarm_rate']):+.0f} / "
                         f"{drift['image_auroc'] - clean['image_auroc']:+.3f}")
        lines.append(f"| {row['category']} | {row['row']} | " + " | ".join(cells) + " |")
    studied = [row for row in rows if "validation" in row]
    if studied:
        lines += ["", "## Validation: image-score variants (unseen normal images + local defects; never test)", "",
                  "Per model, means over the categories studied. Drift: the largest change of the false-alarm rate "
                  "(points) against clean, under ±2/255 brightness and the bf16 backbone, and under a ±8 px shift. "
                  "F1 at the 5 % false-alarm-rate threshold (the shipped rule) and at the F1-optimal threshold on "
                  "anomalib's synthetic anomalies.", "",
                  "| model | categories | variant | image AUROC | Δ rate, brightness / bf16 | Δ rate, shift | "
                  "false-alarm rate | F1, rate rule | F1, synthetic-F1 rule |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for model in dict.fromkeys(row["row"] for row in studied):
            mine = [row for row in studied if row["row"] == model]
            names = ", ".join(row["category"] for row in mine)
            for name in dict.fromkeys(name for row in mine for name in row["validation"]["variants"]):
                per_row = [row["validation"]["variants"][name] for row in mine if name in row["validation"]["variants"]]

                def worst(variant: dict, conditions: tuple[str, ...]) -> float:
                    base = variant["clean"]["fpr_rule"]["false_alarm_rate"]
                    return max(abs(variant[c]["fpr_rule"]["false_alarm_rate"] - base) for c in conditions)

                clean = [v["clean"] for v in per_row]
                lines.append(
                    f"| {model} | {names} | {name} | {_mean([c['auroc'] for c in clean]):.3f} | "
                    f"{100 * _mean([worst(v, ('bright+2', 'bright-2', 'bf16')) for v in per_row]):.0f} | "
                    f"{100 * _mean([worst(v, ('shift+8', 'shift-8')) for v in per_row]):.0f} | "
                    f"{_mean([c['fpr_rule']['false_alarm_rate'] for c in clean]):.2f} | "
                    f"{_mean([c['fpr_rule']['f1'] for c in clean]):.3f} | "
                    f"{_mean([c['f1_rule']['f1'] for c in clean]):.3f} |")
        pixel_rows = [row for row in studied if "pixel_f1" in row["validation"]]
        lines += [] if not pixel_rows else [
                  "", "Pixel F1 on the same validation images (masks on images labelled anomalous), per pixel rule:",
                  "",
                  "| category | model | " + " | ".join(pixel_rows[0]["validation"]["pixel_f1"]) + " |",
                  "|---|---|" + "---:|" * len(pixel_rows[0]["validation"]["pixel_f1"])]
        for row in pixel_rows:
            lines.append(f"| {row['category']} | {row['row']} | "
                         + " | ".join(f"{v:.3f}" for v in row["validation"]["pixel_f1"].values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--categories", nargs="+", default=["bottle", "tire", "generated"])
    parser.add_argument("--max-minutes", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decisions")
    parser.add_argument("--save-checkpoints", type=Path, default=None,
                        help="DIR/<Model>_<category>.ckpt (ours), .pt (anomalib)")
    parser.add_argument("--train-shift", type=int, default=0,
                        help="train with random shifts of up to this many px of the dataset frame (RandomReflectShift)")
    parser.add_argument("--load-checkpoints", type=Path, default=None,
                        help="DIR of --save-checkpoints: our rows load <Model>_<category>.ckpt instead of training")
    parser.add_argument("--validation-rows", nargs="*", default=["cflow_ad", "fastflow", "csflow"],
                        help="rows that also run the validation study (it costs 2-3 test read-outs)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json only")
    args = parser.parse_args()
    path = args.out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if args.markdown_only:
        args.out.with_suffix(".md").write_text(markdown(results))
        return
    results["machine"] = cpu_model()
    for category in args.categories:
        for row in args.rows:
            print(f"== {row} on {category}", flush=True)
            model, data, info = trained(row, category, args.max_minutes, args.batch_size, args.save_checkpoints,
                                        args.load_checkpoints, args.train_shift)
            ours = not row.startswith("anomalib")
            previous = next((r for r in results["rows"] if (r["row"], r["category"]) == (row, category)), {})
            if "checkpoint" in info and "test" in previous:  # a loaded model: its training run's record stands
                record = {**previous, "validation_command": "python benchmarks/decisions.py " + " ".join(sys.argv[1:])}
            else:
                record = {"row": row, "category": category, **info,
                          "command": "python benchmarks/decisions.py " + " ".join(sys.argv[1:]),
                          "test": test_readout(model, data, ours)}
            if ours and row in args.validation_rows:
                record["validation"] = validation_study(model, data)
            elif "validation" in previous:  # the study of an earlier run (it scores every variant itself)
                record["validation"] = previous["validation"]
            results["rows"] = [r for r in results["rows"] if (r["row"], r["category"]) != (row, category)] + [record]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(markdown(results))
            print(json.dumps(record["test"]["clean"], indent=None)[:600], flush=True)


if __name__ == "__main__":
    main()
