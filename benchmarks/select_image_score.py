"""Choose the image score on validation of several categories, and show why the current one fails.

For each model (its shipped config ``configs/<model>_efficientnet_lite0.yaml``, training capped at ``--max-minutes``)
and each category (MVTec AD bottle, MVTec 3D-AD tire RGB, the generated ``object`` category): train once, then
collect the *unsmoothed* anomaly maps (the scorer's combination of all scales, before any blur) of the normal
training images and of the validation split (20 % of train/good + anomalib's synthetic anomalies). The test split
is never read. From those maps every candidate image score is computed and ranked by validation image AUROC:

- ``max``: the maximum of the unsmoothed map (the current score);
- ``smoothed_max_s{σ}``: the maximum after a Gaussian blur of σ input pixels (a single hot pixel cannot decide it);
- ``top_mean_{q}``: the mean of the top ``q`` fraction of the map;
- ``position_z_max`` / ``position_z_smoothed_max_s4``: the map standardised per position with the mean and standard
  deviation of the normal training maps at that position (fixed-pattern effects such as borders or the part's own
  structure cancel), then its (smoothed) maximum. ``position_z_max`` is what ``position_score=True`` computes
  (``flowad_plugins.position_statistics``).

The failure analysis: where the maximum sits (fraction in the border band, the outer ``BORDER_FRACTION`` of each
side) for normal and anomalous validation images, and the spread of the scores of each class. Writes
``benchmarks/results/image_score_selection.{json,md}``::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/select_image_score.py --max-minutes 5
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
from anomalib.engine import Engine
from harness.datasets import validation_split_datamodule
from harness.machine import cpu_model, machine_info
from harness.models import SHIPPED_CONFIGS, shipped_config, shipped_init
from harness.report import metric_cell
from lightning.pytorch import seed_everything
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

import flowad_plugins
from flowad_plugins.position_statistics import ScoreMapStatistics, fit_score_map_statistics
from flowad_plugins.scoring import SeparableGaussianBlur

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = SHIPPED_CONFIGS
CATEGORIES = ("bottle", "tire", "generated")
BORDER_FRACTION = 1 / 16
PIXEL_METRIC_SIZE = 256  # pixel AUROC on maps area-averaged to at most this side


def datamodule(category: str, batch_size: int, held_out: str = "random"):
    """The category's datamodule with validation = 20 % of train/good (a random share, seed 0, or the last images in
    file order: ``held_out``) + synthetic anomalies."""
    return validation_split_datamodule(category, batch_size, held_out=held_out)


def shipped_model(name: str):
    """The model of ``configs/<name>``'s ``init_args``, and the config's epoch count."""
    return getattr(flowad_plugins, name)(**shipped_init(name)), int(shipped_config(name)["trainer"]["max_epochs"])


def load_selection_checkpoint(model, checkpoint: Path) -> None:
    """Load a selection run's Lightning checkpoint into ``model`` (weights only; buffers of older scorers that no
    longer exist, ``*.position_*``, are skipped)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k: v for k, v in state.items() if ".position_" not in k})


def model_inputs(model, images: torch.Tensor) -> torch.Tensor:
    """``images`` (``B×3×H×W``, any size) resized and normalised as the Engine does in training, validation and test:
    the pre-processor's ``transform`` (antialiased resize). Its ``forward`` is the export path, which resizes without
    antialiasing; on frames larger than the model that gives other pixels than the ones the model was trained on."""
    return model.pre_processor.transform(images) if model.pre_processor else images


@torch.no_grad()
def unsmoothed_maps(model, loader, map_scales: list[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``N×H×W`` unsmoothed maps (higher = more anomalous), ``N`` labels and ``N×H×W`` masks of ``loader``; the map
    of every scale (whatever the model's ``score_scales``), or of ``map_scales`` only."""
    maps, labels, masks = [], [], []
    model.eval()
    with model.model.scorer.plain_score_maps():
        model.model.scorer.map_scales = map_scales  # the context restores the model's own on exit
        for batch in loader:
            images = model_inputs(model, batch.image)
            output = model.model(images)
            maps.append(output.anomaly_map.float().reshape(len(images), *output.anomaly_map.shape[-2:]))
            labels.append(batch.gt_label.reshape(-1).int())
            if batch.gt_mask is not None:
                mask = batch.gt_mask.float().reshape(len(images), 1, *batch.gt_mask.shape[-2:])
                masks.append(F.interpolate(mask, size=maps[-1].shape[-2:], mode="nearest")[:, 0] > 0.5)
            else:
                masks.append(torch.zeros_like(maps[-1], dtype=torch.bool))
    return torch.cat(maps), torch.cat(labels), torch.cat(masks)


def smoothed(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    return SeparableGaussianBlur(sigma)(maps[:, None])[:, 0]


def shift_tolerant_standardised(statistics: ScoreMapStatistics, maps: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``N×H×W`` maps standardised per position, each position with the statistics of the position within
    ``±tolerance`` of the side (a 5×5 grid of offsets) that makes it least unusual: for parts that sit a little
    differently in every frame, a normal structure that has moved is forgiven, a defect (unusual everywhere near) is
    not. A validation candidate (``position_z_tolerant_*``), not used by the models."""
    height, width = maps.shape[-2:]
    mean, std = statistics.resized((height, width))
    reach_h, reach_w = round(tolerance * height), round(tolerance * width)
    padded = [F.pad(v[None, None], (reach_w, reach_w, reach_h, reach_h), mode="replicate")[0, 0] for v in (mean, std)]
    least = None
    for dy in sorted({round(reach_h * f) for f in (-1, -0.5, 0, 0.5, 1)}):
        for dx in sorted({round(reach_w * f) for f in (-1, -0.5, 0, 0.5, 1)}):
            window = (slice(reach_h + dy, reach_h + dy + height), slice(reach_w + dx, reach_w + dx + width))
            z = (maps - padded[0][window]) / padded[1][window]
            least = z if least is None else torch.minimum(least, z)
    return least


def shrunk_standardised(statistics: ScoreMapStatistics, maps: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``N×H×W`` maps standardised per position with a variance shrunk toward the map's typical one:
    ``(m − μ) / sqrt(σ² + shrinkage · median(σ²))``. The statistics come from the images the flow was fitted on;
    where it has learnt those by heart their σ is too small for unseen normal images, and one such position can
    decide a normal image's maximum. ``shrinkage`` ∞ is the mean-subtracted map (``position_mean_max``). A
    validation candidate (``position_z_shrunk_*``), not used by the models."""
    mean, std = statistics.resized(maps.shape[-2:])
    variance = std.pow(2)
    return (maps - mean) / (variance + shrinkage * variance.median()).sqrt()


def position_standardised(train_maps: torch.Tensor, maps: torch.Tensor) -> tuple[ScoreMapStatistics, torch.Tensor]:
    """Per-position statistics fitted on the normal ``train_maps`` (``N×H×W``) and ``maps`` standardised with them."""
    statistics = ScoreMapStatistics()
    statistics.fit([train_maps])
    return statistics, statistics.standardise(maps[:, None])[:, 0]


def candidate_scores(train_maps: torch.Tensor, maps: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``{candidate: N scores}`` of the validation ``maps``, and the per-position standardised maps."""
    flat = maps.flatten(1)
    statistics, position_z = position_standardised(train_maps, maps)
    scores = {"max": flat.amax(dim=1)}
    for sigma in (2.0, 4.0, 8.0):
        scores[f"smoothed_max_s{sigma:g}"] = smoothed(maps, sigma).flatten(1).amax(dim=1)
    for fraction in (0.001, 0.01):
        count = max(1, int(fraction * flat.shape[1]))
        scores[f"top_mean_{fraction:g}"] = flat.topk(count, dim=1).values.mean(dim=1)
    scores["position_z_max"] = position_z.flatten(1).amax(dim=1)
    scores["position_z_smoothed_max_s4"] = smoothed(position_z, 4.0).flatten(1).amax(dim=1)
    for shrinkage in (0.5, 2.0):
        shrunk = shrunk_standardised(statistics, maps, shrinkage)
        scores[f"position_z_shrunk_{shrinkage:g}_max"] = shrunk.flatten(1).amax(dim=1)
        scores[f"position_z_shrunk_{shrinkage:g}_smoothed_max_s4"] = smoothed(shrunk, 4.0).flatten(1).amax(dim=1)
    mean_subtracted = maps - statistics.resized(maps.shape[-2:])[0]
    scores["position_mean_max"] = mean_subtracted.flatten(1).amax(dim=1)
    scores["position_mean_smoothed_max_s4"] = smoothed(mean_subtracted, 4.0).flatten(1).amax(dim=1)
    for tolerance in (1 / 16, 1 / 8):
        tolerant = shift_tolerant_standardised(statistics, maps, tolerance)
        scores[f"position_z_tolerant_{tolerance:g}_max"] = tolerant.flatten(1).amax(dim=1)
        scores[f"position_z_tolerant_{tolerance:g}_smoothed_max_s4"] = smoothed(tolerant, 4.0).flatten(1).amax(dim=1)
    return scores, position_z


def border_share(maps: torch.Tensor) -> torch.Tensor:
    """Per image: whether its maximum lies in the border band (the outer ``BORDER_FRACTION`` of a side)."""
    height, width = maps.shape[-2:]
    index = maps.flatten(1).argmax(dim=1)
    rows, cols = index // width, index % width
    band_h, band_w = max(1, int(height * BORDER_FRACTION)), max(1, int(width * BORDER_FRACTION))
    return (rows < band_h) | (rows >= height - band_h) | (cols < band_w) | (cols >= width - band_w)


def pixel_auroc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """Pixel AUROC of ``N×H×W`` maps against ``N×H×W`` masks, both reduced to at most ``PIXEL_METRIC_SIZE`` a side
    (maps area-averaged, masks nearest)."""
    size = [min(side, PIXEL_METRIC_SIZE) for side in maps.shape[-2:]]
    target = F.interpolate(masks[:, None].float(), size=size, mode="nearest").flatten().int()
    resized = F.interpolate(maps[:, None].float(), size=size, mode="area").flatten()
    return round(float(binary_auroc(resized, target)), 4)


def analyse(train_maps: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> dict:
    scores, position_z = candidate_scores(train_maps, maps)
    image_auroc = {name: round(float(binary_auroc(values, labels)), 4) for name, values in scores.items()}
    anomalous = labels == 1
    pixel = {}
    if bool(masks.any()):
        for name, values in (("map", maps), ("map_s4", smoothed(maps, 4.0)), ("map_s8", smoothed(maps, 8.0)),
                             ("map_s12", smoothed(maps, 12.0)), ("map_s16", smoothed(maps, 16.0)),
                             ("map_s24", smoothed(maps, 24.0)), ("map_s32", smoothed(maps, 32.0)),
                             ("position_z_s4", smoothed(position_z, 4.0))):
            pixel[name] = pixel_auroc(values, masks)
    at_border = border_share(maps)
    current = scores["max"]
    return {
        "val_images": {"normal": int((~anomalous).sum()), "anomalous": int(anomalous.sum())},
        "val_image_AUROC": image_auroc,
        "val_pixel_AUROC": pixel,
        "max_at_border": {"normal": round(float(at_border[~anomalous].float().mean()), 3),
                          "anomalous": round(float(at_border[anomalous].float().mean()), 3),
                          "train": round(float(border_share(train_maps).float().mean()), 3)},
        "max_score": {kind: {"median": round(float(current[mask].median()), 3),
                             "p10": round(float(current[mask].quantile(0.1)), 3),
                             "p90": round(float(current[mask].quantile(0.9)), 3)}
                      for kind, mask in (("normal", ~anomalous), ("anomalous", anomalous))},
    }


def run(name: str, category: str, max_minutes: float, batch_size: int, checkpoints: Path | None) -> dict:
    seed_everything(0, workers=True)
    model, epochs = shipped_model(name)
    data = datamodule(category, batch_size)
    engine = Engine(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=True,
                    default_root_dir=Path(mkdtemp()), max_time={"minutes": max_minutes}, num_sanity_val_steps=0)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    train_seconds = time.perf_counter() - start
    if checkpoints is not None:  # for test runs of the chosen score without training again
        checkpoints.mkdir(parents=True, exist_ok=True)
        engine.trainer.save_checkpoint(checkpoints / f"{name}_{category}.ckpt")
    train_maps, _, _ = unsmoothed_maps(model, data.train_dataloader())
    maps, labels, masks = unsmoothed_maps(model, data.val_dataloader())
    return {"model": name, "category": category, "epochs_run": engine.trainer.current_epoch, "epochs_config": epochs,
            "train_seconds": round(train_seconds, 1), **analyse(train_maps, maps, labels, masks)}


def test_chosen(name: str, category: str, checkpoint: Path, chosen: dict, batch_size: int) -> dict:
    """Test metrics of a selection run's checkpoint with the plain score and with the ``chosen`` scorer settings
    (``position_score`` statistics fitted on the training images first).

    Each setting is validated first (thresholds and normalisation from the validation split), then tested.
    """
    seed_everything(0, workers=True)
    model, _ = shipped_model(name)
    load_selection_checkpoint(model, checkpoint)
    data = datamodule(category, batch_size)
    data.prepare_data()  # the generated category is written here
    data.setup("fit")
    engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    default_root_dir=Path(mkdtemp()))
    scorer = model.model.scorer
    metrics = {}
    for setting, values in (("plain", {"position_score": False, "score_blur_sigma": 0.0}), ("chosen", chosen)):
        scorer.position_score, scorer.score_blur_sigma = values["position_score"], values["score_blur_sigma"]
        if scorer.position_score and not scorer.map_statistics.fitted:
            fit_score_map_statistics(model, data.train_dataloader())
        engine.validate(model=model, datamodule=data, verbose=False)
        result = engine.test(model=model, datamodule=data, verbose=False)[0]
        metrics[setting] = {**values, **{k: round(float(v), 4) for k, v in result.items()}}
    return {"model": name, "category": category, **metrics}


def markdown(results: list[dict], command: str) -> str:
    candidates = list(dict.fromkeys(c for row in results for c in row["val_image_AUROC"]))
    lines = ["# Image-score selection on validation (never test)", "",
             f"`{command}`; machine: {cpu_model()}, {torch.get_num_threads()} threads. Validation = 20 % of train/good"
             " + synthetic anomalies; shipped configs, training capped in minutes.", "",
             "| model | category | epochs | train s | " + " | ".join(candidates) + " |",
             "|---|---|---:|---:|" + "---:|" * len(candidates)]
    for row in results:
        aurocs = " | ".join(metric_cell(row["val_image_AUROC"].get(c)) for c in candidates)
        lines.append(f"| {row['model']} | {row['category']} | {row['epochs_run']}/{row['epochs_config']} | "
                     f"{row['train_seconds']:.0f} | {aurocs} |")
    lines += ["", "Mean validation image AUROC per model over the categories:", "",
              "| model | " + " | ".join(candidates) + " |", "|---|" + "---:|" * len(candidates)]
    for model in dict.fromkeys(row["model"] for row in results):
        rows = [row for row in results if row["model"] == model]
        lines.append(f"| {model} | " + " | ".join(
            metric_cell(np.mean(values) if len(values := [row["val_image_AUROC"][c] for row in rows
                                                    if c in row["val_image_AUROC"]]) == len(rows) else None)
            for c in candidates) + " |")
    lines += ["", "Failure analysis (the current score, `max`): share of image maxima in the border band "
              f"(outer {BORDER_FRACTION:.4g} of each side) and score quantiles (p10 / median / p90); validation pixel "
              "AUROC of the map unsmoothed, blurred (σ 4) and standardised per position then blurred.", "",
              "| model | category | max at border: train / val normal / val anomalous | normal max score | "
              "anomalous max score | pixel AUROC map / s4 / position-z s4 |", "|---|---|---|---|---|---|"]
    for row in results:
        border, score, pixel = row["max_at_border"], row["max_score"], row["val_pixel_AUROC"]
        quantiles = {kind: f"{v['p10']:.2f} / {v['median']:.2f} / {v['p90']:.2f}" for kind, v in score.items()}
        lines.append(f"| {row['model']} | {row['category']} | {border['train']:.2f} / {border['normal']:.2f} / "
                     f"{border['anomalous']:.2f} | {quantiles['normal']} | {quantiles['anomalous']} | "
                     + " / ".join(f"{pixel.get(k, float('nan')):.3f}" for k in ("map", "map_s4", "position_z_s4"))
                     + " |")
    return "\n".join(lines) + "\n"


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--models`` and ``--categories``, shared with the other selection scripts."""
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=list(CATEGORIES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection_arguments(parser)
    parser.add_argument("--max-minutes", type=float, default=5.0, help="training budget per model and category")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "image_score_selection")
    parser.add_argument("--save-checkpoints", type=Path, default=None, help="folder for the trained checkpoints")
    parser.add_argument("--test-checkpoints", type=Path, default=None,
                        help="after the choice: test the saved checkpoints with --chosen (no training)")
    parser.add_argument("--chosen", type=yaml.safe_load, default="{position_score: true, score_blur_sigma: 0.0}",
                        help="scorer settings of the chosen default, as YAML")
    args = parser.parse_args()
    if args.test_checkpoints is not None:
        out = args.out.with_name(args.out.name + "_test.json")
        tested = json.loads(out.read_text())["results"] if out.is_file() else []
        for category in args.categories:
            for name in args.models:
                if any(row["model"] == name and row["category"] == category for row in tested):
                    continue
                tested.append(test_chosen(name, category, args.test_checkpoints / f"{name}_{category}.ckpt",
                                          args.chosen, args.batch_size))
                command = "python benchmarks/select_image_score.py --test-checkpoints CKPT_DIR"
                out.write_text(json.dumps({"command": command, "machine": cpu_model(), "results": tested},
                                          indent=1) + "\n")
        print(json.dumps(tested, indent=1))
        return
    shown = [arg for index, arg in enumerate(sys.argv[1:]) if arg != "--save-checkpoints"
             and (index == 0 or sys.argv[index] != "--save-checkpoints")]  # a local folder: not part of the result
    command = "python benchmarks/select_image_score.py " + " ".join(shown)
    partial = args.out.with_suffix(".json")
    results = json.loads(partial.read_text())["results"] if partial.is_file() else []
    done = {(row["model"], row["category"]) for row in results}
    for category in args.categories:
        for name in args.models:
            if (name, category) in done:
                continue
            print(f"== {name} on {category}", flush=True)
            results.append(run(name, category, args.max_minutes, args.batch_size, args.save_checkpoints))
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"command": command, "machine": {
                **machine_info(torch.get_num_threads()), "torch": torch.__version__}, "results": results}, indent=1))
            args.out.with_suffix(".md").write_text(markdown(results, command))
    print(markdown(results, command))


if __name__ == "__main__":
    main()
