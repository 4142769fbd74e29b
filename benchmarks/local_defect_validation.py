r"""Rank candidates on a validation split of small, subtle defects (``flowad_plugins.data.local_defects``).

anomalib's synthetic validation blobs are large; every model separates them almost perfectly, and the ranking they
give did not carry over to tire's real defects (``image_score_selection.md``). Here the normal images of the same
validation split (20 % of train/good, seed 0; never the test split) get local defects (a transplanted
patch, a soft spot or a short scratch, 2–12 % of the shorter side), so the split holds every held-out normal image
once as normal and once with each kind of defect. Rows with ``"val_normals": "all_held_out"`` use all of them;
older rows used the random half that anomalib's synthetic split keeps normal, which changes with the global random
state (a model trained in the run and the same model loaded from its checkpoint then see different images), and
rows without ``"input_resize": "antialiased"`` resized the validation frames without antialiasing (the export
path) while the model had trained on antialiased ones. Each model is scored with the same candidates as
``select_image_score.py`` (image AUROC per image score; pixel AUROC of the map), and with its own shipped
image score (``own_score``).

A model is either trained (shipped config, ``--init key=value`` overrides, ``--max-minutes`` of training) or
loaded from ``--checkpoints DIR/<model>_<category>.ckpt`` (e.g. the ones ``select_image_score.py
--save-checkpoints`` wrote). Rows are appended to ``--out`` (``.json`` and ``.md``) under ``--tag``::

    OMP_NUM_THREADS=2 python benchmarks/local_defect_validation.py --checkpoints CKPT_DIR --tag shipped
    OMP_NUM_THREADS=2 python benchmarks/local_defect_validation.py --models CSFlow --init layer=blocks.2 \
        --tag csflow_blocks2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path
from tempfile import mkdtemp
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.datasets import HELD_OUT
from harness.machine import cpu_model
from harness.models import shipped_config
from select_image_score import (
    RESULTS,
    add_selection_arguments,
    analyse,
    datamodule,
    load_selection_checkpoint,
    pixel_auroc,
    position_standardised,
    shipped_model,
    smoothed,
    unsmoothed_maps,
)

from flowad_plugins.data.local_defects import KINDS, add_local_defect


def held_out_normal_images(data) -> list[torch.Tensor]:
    """Every normal image held out of training for validation (``C×H×W``, in file order).

    anomalib's synthetic validation split turns a random half of them into anomalies with the *global* generator, so
    its normal half depends on what ran before the set-up (a fit sets the data up again). The held-out set itself is
    drawn with the datamodule's seed: the same images whether the model was trained now or loaded.
    """
    paths = sorted(str(path) for path in data.val_data.source_samples.image_path)
    return [read_image(path, as_tensor=True) for path in paths]


def local_defect_batches(data, batch_size: int, seed: int = 0) -> list[SimpleNamespace]:
    """Batches (``image``, ``gt_label``, ``gt_mask``) of the held-out normal images, each once as is and once with
    each kind of local defect (donor: the next held-out image)."""
    normals = held_out_normal_images(data)
    rng = np.random.default_rng(seed)
    samples = []
    for index, image in enumerate(normals):
        donor = normals[(index + 1) % len(normals)]
        samples.append((image, 0, torch.zeros(image.shape[-2:], dtype=torch.bool)))
        for kind in KINDS:
            defective, mask = add_local_defect(image, donor, rng, kind)
            samples.append((defective, 1, mask))
    return [SimpleNamespace(image=torch.stack([s[0] for s in chunk]), gt_label=torch.tensor([s[1] for s in chunk]),
                            gt_mask=torch.stack([s[2] for s in chunk]))
            for chunk in (samples[i:i + batch_size] for i in range(0, len(samples), batch_size))]


@contextmanager
def scorer_inputs(model) -> Iterator[list[tuple[list[torch.Tensor], tuple[int, int]]]]:
    """Within: every call of the model's scorer appends its input (the per-scale log-likelihood maps ``B×h_l×w_l``
    and the image size) to the yielded list, so other scorings of the same images need no second forward pass."""
    captured = []
    handle = model.model.scorer.register_forward_pre_hook(
        lambda _, args: captured.append(([values.detach() for values in args[0]], tuple(int(v) for v in args[1]))))
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def replayed_maps(model, inputs: list, map_scales: list[int] | None) -> torch.Tensor:
    """``N×H×W`` unsmoothed maps of ``map_scales`` from captured scorer ``inputs`` (``scorer_inputs``)."""
    scorer = model.model.scorer
    with scorer.plain_score_maps():
        scorer.map_scales = map_scales  # the context restores the model's own on exit
        maps = [scorer(values, size).anomaly_map.float() for values, size in inputs]
    return torch.cat([m.reshape(len(m), *m.shape[-2:]) for m in maps])


def per_scale_maps(model, inputs: list) -> list[torch.Tensor]:
    """One ``N×H×W`` unsmoothed map per scale of the model (higher = more anomalous), as the scorer combines it."""
    return [replayed_maps(model, inputs, [scale]) for scale in range(model.model.scorer.statistics.mean.numel())]


def per_scale_scores(train_maps: list[torch.Tensor], maps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Image-score candidates from each scale's map standardised per position (normal-training statistics):
    the maximum of each scale alone, the maximum over scales, and the maximum of their mean, each also after a
    Gaussian blur of σ 4 input pixels (``*_smoothed_max_s4``, CS-Flow's score blur). ``position_z_max`` standardises
    the every-scale map instead (``unsmoothed_maps`` ignores a model's own ``score_scales``); the model's own score
    is ``own_score``."""
    standardised = [position_standardised(train, values)[1] for train, values in zip(train_maps, maps, strict=True)]
    stacked = torch.stack(standardised)  # S×N×H×W
    scores = {}
    for suffix, blurred in (("max", standardised), ("smoothed_max_s4", [smoothed(z, 4.0) for z in standardised])):
        for scale, z in enumerate(blurred):
            scores[f"scale{scale}_z_{suffix}"] = z.flatten(1).amax(dim=1)
        scores[f"scales_z_max_of_{suffix}"] = torch.stack(blurred).flatten(2).amax(dim=2).amax(dim=0)
    scores["scales_z_mean_max"] = stacked.mean(dim=0).flatten(1).amax(dim=1)
    scores["scales_z_mean_smoothed_max_s4"] = smoothed(stacked.mean(dim=0), 4.0).flatten(1).amax(dim=1)
    return scores


def per_scale_pixel_auroc(model, inputs: list, masks: torch.Tensor) -> dict[str, float]:
    """Pixel AUROC of the map made of each proper subset of the model's scales (``map_scales``), smoothed with the
    model's own ``blur_sigma``: which scales should localise."""
    count = model.model.scorer.statistics.mean.numel()
    sigma = model.model.scorer.blur_sigma
    result = {}
    for size in range(1, count):
        for subset in combinations(range(count), size):
            maps = replayed_maps(model, inputs, list(subset))
            result["scales_" + "_".join(map(str, subset))] = pixel_auroc(smoothed(maps, sigma) if sigma else maps,
                                                                         masks)
    return result


@torch.no_grad()
def own_scores(model, inputs: list) -> torch.Tensor:
    """``N`` image scores as the model computes them (its shipped scorer: ``score_scales``, position statistics,
    ``score_blur_sigma``) from captured scorer ``inputs``, before the post-processor's normalisation (a monotone
    map: the same AUROC)."""
    model.eval()
    return torch.cat([model.model.scorer(values, size).pred_score.float().reshape(-1) for values, size in inputs])


def prepared_model(name: str, category: str, init: dict, checkpoints: Path | None, max_minutes: float,
                   batch_size: int, save_to: Path | None = None, held_out: str = "random"):
    """The model (trained now, or loaded), its datamodule, and a record of how it was made."""
    seed_everything(0, workers=True)
    model, epochs = shipped_model(name)
    if init:
        config = shipped_config(name)["model"]["init_args"]
        model = type(model)(**{**{k: v for k, v in config.items() if k != "seed"}, **init})
    data = datamodule(category, batch_size, held_out)
    data.prepare_data()
    data.setup("fit")
    if checkpoints is not None:
        load_selection_checkpoint(model, checkpoints / f"{name}_{category}.ckpt")
        return model, data, {"source": "checkpoint"}
    engine = Engine(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=True,
                    default_root_dir=Path(mkdtemp()), max_time={"minutes": max_minutes}, num_sanity_val_steps=0)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    if save_to is not None:  # for a test read-out of the chosen candidate without training again
        save_to.mkdir(parents=True, exist_ok=True)
        engine.trainer.save_checkpoint(save_to / f"{name}_{category}.ckpt")
    return model, data, {"source": "trained", "epochs_run": engine.trainer.current_epoch, "epochs_config": epochs,
                         "train_seconds": round(time.perf_counter() - start, 1)}


def markdown(rows: list[dict], command: str) -> str:
    candidates = ["max", "smoothed_max_s4", "top_mean_0.01", "position_z_max", "position_z_smoothed_max_s4",
                  "position_z_tolerant_0.0625_max", "position_z_tolerant_0.125_max", "own_score"]
    lines = ["# Candidates on the local-defect validation split (never test)", "",
             f"`{command}` (one command per tag: see each row's `command` in the JSON); machine: {cpu_model()}.", "",
             "| tag | model | category | val images (normal / defective) | image AUROC: " + " / ".join(candidates)
             + " | pixel AUROC map |", "|---|---|---|---|---|---:|"]
    for row in rows:
        image = " / ".join(f"{row['val_image_AUROC'].get(c, float('nan')):.3f}" for c in candidates)
        count = row["val_images"]
        lines.append(f"| {row['tag']} | {row['model']} | {row['category']} | {count['normal']} / "
                     f"{count['anomalous']} | {image} | {row['val_pixel_AUROC'].get('map', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection_arguments(parser)
    parser.add_argument("--checkpoints", type=Path, default=None, help="load DIR/<model>_<category>.ckpt")
    parser.add_argument("--init", nargs="*", default=[], help="model overrides key=value (YAML values)")
    parser.add_argument("--max-minutes", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--save-checkpoints", type=Path, default=None, help="folder for trained checkpoints")
    parser.add_argument("--per-scale", action="store_true",
                        help="also score each scale's per-position standardised map (per_scale_scores)")
    parser.add_argument("--held-out", choices=HELD_OUT, default="random",
                        help="validation holds out a random 20 %% of train/good (seed 0) or the last 20 %% in file "
                             "order: images of later capture sessions (harness.datasets)")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", type=Path, default=RESULTS / "local_defect_validation")
    args = parser.parse_args()
    init = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.init)}
    local = {str(args.checkpoints), str(args.save_checkpoints)}  # local folders: not part of the result
    shown = ["DIR" if a in local else a for a in sys.argv[1:]]
    command = shlex.join(["python", "benchmarks/local_defect_validation.py", *shown])  # pastes as is
    path = args.out.with_suffix(".json")
    rows = json.loads(path.read_text())["results"] if path.is_file() else []
    for category in args.categories:
        for name in args.models:
            if any(r["tag"] == args.tag and r["model"] == name and r["category"] == category for r in rows):
                continue
            print(f"== {args.tag}: {name} on {category}", flush=True)
            model, data, made = prepared_model(name, category, init, args.checkpoints, args.max_minutes,
                                               args.batch_size, args.save_checkpoints, args.held_out)
            with scorer_inputs(model) as train_inputs:
                train_maps, _, _ = unsmoothed_maps(model, data.train_dataloader())
            with scorer_inputs(model) as inputs:
                maps, labels, masks = unsmoothed_maps(model, local_defect_batches(data, args.batch_size))
            row = analyse(train_maps, maps, labels, masks)
            row["val_image_AUROC"]["own_score"] = round(float(binary_auroc(own_scores(model, inputs), labels)), 4)
            if args.per_scale:
                scale_scores = per_scale_scores(per_scale_maps(model, train_inputs), per_scale_maps(model, inputs))
                row["val_image_AUROC_per_scale"] = {name: round(float(binary_auroc(values, labels)), 4)
                                                    for name, values in scale_scores.items()}
                row["val_pixel_AUROC_per_scale"] = per_scale_pixel_auroc(model, inputs, masks)
            rows.append({"tag": args.tag, "model": name, "category": category, "init": init, "command": command,
                         "val_normals": "all_held_out", "input_resize": "antialiased", "held_out": args.held_out,
                         **made, **row})
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"machine": cpu_model(), "results": rows}, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
