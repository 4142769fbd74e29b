"""False-alarm-rate thresholds from normal validation images only, against anomalib's default threshold.

For each model: train briefly on MVTec AD bottle with validation = 20 % of train/good and nothing else
(``val_split_mode="from_train"``), with ``FlowPostProcessor(image_fpr, pixel_fpr)``. Then, on the same trained
model and the same validation predictions, also compute anomalib's default ``PostProcessor`` thresholds
(F1-adaptive; with normal-only validation anomalib 2.7 falls back to the highest normal score). Report, for both,
the false-alarm rate on test/good and the recall on defective test images (image level), and the pixel
false-alarm rate on test/good pixels and the recall of defect pixels (pixel level). Nothing is chosen on test.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/thresholds_bottle.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from lightning.pytorch import seed_everything
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from harness.machine import machine_info  # noqa: E402
from harness.models import SHIPPED_CONFIGS, shipped_config  # noqa: E402

import flowad_plugins  # noqa: E402
from flowad_plugins.post_processing import FlowPostProcessor  # noqa: E402

CONFIGS = SHIPPED_CONFIGS
DEFAULT_EPOCHS = {"CflowAD": 3, "FastFlow": 10, "CSFlow": 4}
BATCH_SIZE = {"CflowAD": 16, "FastFlow": 16, "CSFlow": 8}


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of a rate (scipy's Beta quantiles)."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return low, high


def _transform(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's resize + normalise applied to ``batch`` (image ``B×3×H×W``, mask ``B×H×W``; zeros if absent)."""
    mask = batch.gt_mask
    if mask is None:
        mask = torch.zeros(len(batch.image), *batch.image.shape[-2:], dtype=torch.bool)
    return model.pre_processor.transform(batch.image, mask)


@torch.no_grad()
def raw_predictions(model, dataloader) -> dict[str, torch.Tensor]:
    """Raw (un-normalised) scores ``(N,)``, maps ``(N, H, W)``, labels ``(N,)`` and masks ``(N, H, W)``."""
    model.eval()
    scores, maps, labels, masks = [], [], [], []
    for batch in dataloader:
        image, mask = _transform(model, batch)
        output = model.model(image)
        scores.append(output.pred_score.flatten())
        maps.append(output.anomaly_map.reshape(len(image), *output.anomaly_map.shape[-2:]))
        labels.append(batch.gt_label.flatten().bool())
        masks.append(mask.reshape(len(image), *mask.shape[-2:]).bool())
    return {"score": torch.cat(scores), "map": torch.cat(maps), "label": torch.cat(labels), "mask": torch.cat(masks)}


def anomalib_default_thresholds(model, dataloader) -> tuple[float, float]:
    """anomalib's default ``PostProcessor`` fed the same validation batches: (image, pixel) raw thresholds."""
    post_processor = PostProcessor()
    model.eval()
    with torch.no_grad():
        for batch in dataloader:
            batch.image, batch.gt_mask = _transform(model, batch)
            post_processor.on_validation_batch_end(None, model, batch.update(**model.model(batch.image)._asdict()))
    post_processor.on_validation_epoch_end(None, model)
    return float(post_processor._image_threshold), float(post_processor._pixel_threshold)


def rates_at(test: dict[str, torch.Tensor], image_threshold: float, pixel_threshold: float) -> dict:
    """Image FPR on test/good and recall on defective images; pixel FPR on good images and defect-pixel recall."""
    good, bad = ~test["label"], test["label"]
    flagged = test["score"] > image_threshold
    false_alarms, defects_found = int(flagged[good].sum()), int(flagged[bad].sum())
    pixel_flagged = test["map"] > pixel_threshold
    low, high = clopper_pearson(false_alarms, int(good.sum()))
    return {
        "image_false_alarm_rate": round(false_alarms / int(good.sum()), 4),
        "image_false_alarms": f"{false_alarms}/{int(good.sum())}",
        "image_false_alarm_rate_95ci": [round(low, 4), round(high, 4)],
        "image_recall": round(defects_found / int(bad.sum()), 4),
        "image_defects_found": f"{defects_found}/{int(bad.sum())}",
        "pixel_false_alarm_rate_good_images": round(float(pixel_flagged[good].float().mean()), 6),
        "pixel_recall": round(float(pixel_flagged[test["mask"]].float().mean()), 4),
    }


def run_model(name: str, args: argparse.Namespace) -> dict:
    seed_everything(args.seed, workers=True)
    init = shipped_config(name)["model"]["init_args"]
    post_processor = FlowPostProcessor(image_fpr=args.image_fpr, pixel_fpr=args.pixel_fpr)
    model = getattr(flowad_plugins, name)(**init, post_processor=post_processor)
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=BATCH_SIZE[name],
                         eval_batch_size=16, num_workers=2, val_split_mode="from_train", val_split_ratio=0.2,
                         seed=args.seed)
    epochs = args.epochs.get(name, DEFAULT_EPOCHS[name])
    engine = Engine(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=args.work_dir)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    report = post_processor.threshold_report
    ours = (report["image"]["raw_threshold"], report["pixel"]["raw_threshold"])
    anomalib_default = anomalib_default_thresholds(model, datamodule.val_dataloader())
    test = raw_predictions(model, datamodule.test_dataloader())
    # the exported/forward path must flag exactly what the raw threshold flags
    images = next(iter(datamodule.test_dataloader())).image
    with torch.no_grad():
        full = model(images)
        raw = model.model(model.pre_processor(images))
    consistent = bool(torch.equal(full.pred_label.flatten().bool(), raw.pred_score.flatten() > ours[0]))
    return {
        "model": name,
        "config": f"configs/{CONFIGS[name]}",
        "epochs": epochs,
        "train_seconds": round(train_seconds, 1),
        "validation_normal_images": report["normal_images"],
        "test_good_images": int((~test["label"]).sum()),
        "test_defective_images": int(test["label"].sum()),
        "ours": {"image_fpr": args.image_fpr, "pixel_fpr": args.pixel_fpr, "image_threshold": ours[0],
                 "pixel_threshold": ours[1], "image_rank": report["image"]["rank"],
                 "expected_image_fpr": round(report["image"]["expected_fpr"], 4),
                 "expected_image_fpr_sd": round(report["image"]["expected_fpr_sd"], 4),
                 "validation_pixel_fpr": report["pixel"]["validation_fpr"],
                 "validation_pixel_fpr_se": report["pixel"]["validation_fpr_se"],
                 **rates_at(test, *ours)},
        "anomalib_default": {"image_threshold": anomalib_default[0], "pixel_threshold": anomalib_default[1],
                             **rates_at(test, *anomalib_default)},
        "summary": post_processor.summary(),
        "forward_labels_match_raw_threshold": consistent,
    }


def to_markdown(result: dict) -> str:
    fpr = result["image_fpr"]
    lines = [
        f"# Thresholds from normal validation images only: MVTec AD {result['category']}, image_fpr={fpr}, "
        f"pixel_fpr={result['pixel_fpr']}",
        "",
        "Validation = 20 % of train/good only (`val_split_mode=\"from_train\"`, no anomalies). Both thresholds come "
        "from the same validation predictions of the same trained model: ours = "
        f"`FlowPostProcessor(image_fpr={fpr}, pixel_fpr={result['pixel_fpr']})`; anomalib = its default "
        "`PostProcessor` (F1-adaptive; without anomalous validation images anomalib 2.7 falls back to the highest "
        "normal validation score). Test set: test/good and all defective test images; nothing chosen on it.",
        "",
        "| model | epochs | val normal images | threshold | test/good false-alarm rate (95 % CI) | defective recall | "
        "pixel FPR on good images | defect-pixel recall |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for row in result["models"]:
        for key, label in (("ours", f"ours, image_fpr={fpr} (expected {row['ours']['expected_image_fpr']:.1%})"),
                           ("anomalib_default", "anomalib default")):
            entry = row[key]
            low, high = entry["image_false_alarm_rate_95ci"]
            lines.append(
                f"| {row['model']} | {row['epochs']} | {row['validation_normal_images']} | {label} | "
                f"{entry['image_false_alarm_rate']:.1%} ({entry['image_false_alarms']}; {low:.1%}–{high:.1%}) | "
                f"{entry['image_recall']:.1%} ({entry['image_defects_found']}) | "
                f"{entry['pixel_false_alarm_rate_good_images']:.3%} | {entry['pixel_recall']:.1%} |"
            )
    machine = result["machine"]
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}. "
        f"Seed {result['seed']}. Train seconds: "
        + ", ".join(f"{row['model']} {row['train_seconds']}" for row in result["models"]) + ".",
        "",
        f"Command: `{result['command']}`",
        "",
        "End-of-training summaries:",
        "",
        "```",
        *[row["summary"] for row in result["models"]],
        "```",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "mvtec_ad"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--epochs", nargs="*", default=[], help="overrides, e.g. FastFlow=10")
    parser.add_argument("--image-fpr", type=float, default=0.05)
    parser.add_argument("--pixel-fpr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="results_tmp")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "thresholds_bottle")
    args = parser.parse_args()
    args.epochs = {key: int(value) for key, value in (item.split("=", 1) for item in args.epochs)}
    if not (Path(args.root) / args.category).is_dir():
        parser.error(f"--root: no {args.category} folder under {args.root}")
    rows = []
    for name in tqdm(args.models, desc="models"):
        rows.append(run_model(name, args))
        tqdm.write(json.dumps({k: rows[-1][k] for k in ("model", "ours", "anomalib_default")}, indent=1))
    result = {
        "category": args.category,
        "image_fpr": args.image_fpr,
        "pixel_fpr": args.pixel_fpr,
        "seed": args.seed,
        "models": rows,
        "machine": {**machine_info(torch.get_num_threads()), "torch": torch.__version__},
        "command": "python benchmarks/thresholds_bottle.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    if not math.isfinite(sum(row["ours"]["image_threshold"] for row in rows)):
        sys.exit("non-finite threshold")


if __name__ == "__main__":
    main()
