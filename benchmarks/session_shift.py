r"""Failure analysis (reads the test split, chooses nothing): do the test split's *normal* images score like the
normal images held out of training?

Validation holds out a random 20 % of train/good, taken in the same capture sessions as the training images. If the
test split was captured in another session (other lighting, background or placement), its normal images can look
anomalous to a model that is right about every held-out one, and no validation choice can see it. For each model
(shipped config, trained in the run on the random split or loaded from ``--checkpoints DIR/<model>_<category>.ckpt``)
this scores, with the model's own image score and with the plain maximum of its map (no per-position statistics):

- held-out normal validation images vs test good images: 0.5 = the test normals look like held-out ones;
- held-out normal images vs test defective images: what the test AUROC would be without a session change;
- test good vs test defective: the test image AUROC;

plus where the per-position standardised map of each test-good image peaks (border band, outer 1/16 of each side)
and, without any model, the mean brightness of the frames' background corner and where the part sits. Writes
``benchmarks/results/<category>/session_shift.{json,md,png}`` (the picture: each model's score histograms)::

    OMP_NUM_THREADS=2 python benchmarks/session_shift.py --categories tire bottle --checkpoints CKPT_DIR
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils import read_image
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.datasets import DEFAULT_ROOTS
from harness.machine import cpu_model
from local_defect_validation import held_out_normal_images, own_scores, prepared_model, replayed_maps, scorer_inputs
from select_image_score import BORDER_FRACTION, CONFIGS, RESULTS, candidate_scores, model_inputs, unsmoothed_maps

BATCH = 8
BACKGROUND_CORNER = (slice(-0.2, None), slice(0.0, 0.15))  # bottom-left corner, fractions of height and width


def test_images(category: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(good, defective)`` test images ``3×H×W`` of an MVTec-layout category, in file order."""
    test = DEFAULT_ROOTS[category] / category / "test"
    good = sorted(test.glob("good/*.png"))
    defective = sorted(path for path in test.glob("*/*.png") if path.parent.name != "good")
    return [read_image(str(p), as_tensor=True) for p in good], [read_image(str(p), as_tensor=True) for p in defective]


@torch.no_grad()
def captured_inputs(model, images: list[torch.Tensor]) -> list:
    """One forward pass over ``images``: the scorer's inputs (``local_defect_validation.scorer_inputs``), from which
    every score and map below is replayed without running the backbone and flow again."""
    model.eval()
    with scorer_inputs(model) as inputs:
        for start in range(0, len(images), BATCH):
            model.model(model_inputs(model, torch.stack(images[start:start + BATCH])))
    return inputs


def image_scores(model, inputs: list) -> dict[str, torch.Tensor]:
    """``N`` scores per kind: the model's own (``own``), the plain maximum of its unsmoothed map (``plain_max``), and
    whether the per-position standardised map peaks in the border band (``peak_in_border``, 0/1)."""
    scorer = model.model.scorer
    maps = replayed_maps(model, inputs, scorer.score_scales)[:, None]  # N×1×H×W, as plain_score_maps gives
    standardised = scorer.map_statistics.standardise(maps)[:, 0] if scorer.map_statistics.fitted else maps[:, 0]
    height, width = standardised.shape[-2:]
    peak = standardised.flatten(1).argmax(dim=1)
    row, column = peak // width, peak % width
    band_h, band_w = max(1, round(BORDER_FRACTION * height)), max(1, round(BORDER_FRACTION * width))
    border = (row < band_h) | (row >= height - band_h) | (column < band_w) | (column >= width - band_w)
    return {"own": own_scores(model, inputs), "plain_max": maps.flatten(1).amax(dim=1),
            "peak_in_border": border.float()}


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    labels = torch.cat([torch.zeros(len(negatives)), torch.ones(len(positives))]).int()
    return round(float(binary_auroc(torch.cat([negatives, positives]), labels)), 3)


def background_brightness(images: list[torch.Tensor]) -> list[float]:
    """Mean of each frame's bottom-left corner (0–255): a model-free sign of the capture conditions."""
    values = []
    for image in images:
        height, width = image.shape[-2:]
        rows = slice(round(BACKGROUND_CORNER[0].start * height), None)
        columns = slice(0, round(BACKGROUND_CORNER[1].stop * width))
        values.append(float(image[:, rows, columns].mean()) * 255)
    return values


def part_centre_x(images: list[torch.Tensor]) -> list[float]:
    """Horizontal centre (pixels) of each frame's content brighter than its column median: where the part sits."""
    centres = []
    for image in images:
        profile = image.mean(dim=(0, 1)) * 255
        weights = (profile - profile.median()).clamp_min(0)
        centres.append(float((weights * torch.arange(len(weights))).sum() / weights.sum().clamp_min(1e-9)))
    return centres


def candidate_aurocs(model, data, inputs: list[list]) -> dict[str, dict[str, float]]:
    """Every image-score candidate of ``select_image_score.candidate_scores`` (per-position statistics fitted on the
    training images' unsmoothed maps), scored like the model's own score above, from the captured ``inputs`` of the
    held-out normal, test good and test defective images: which score, if any, would keep the test split's normal
    images apart from its defects."""
    train_maps, _, _ = unsmoothed_maps(model, data.train_dataloader())
    scored = [candidate_scores(train_maps, replayed_maps(model, captured, None))[0] for captured in inputs]
    return {name: {"held_out_vs_test_good": auroc(scored[0][name], scored[1][name]),
                   "held_out_vs_test_defective": auroc(scored[0][name], scored[2][name]),
                   "test_good_vs_test_defective": auroc(scored[1][name], scored[2][name])} for name in scored[0]}


def analyse(name: str, category: str, checkpoints: Path | None, max_minutes: float) -> dict:
    model, data, made = prepared_model(name, category, {}, checkpoints, max_minutes, BATCH)
    held_out = held_out_normal_images(data)
    good, defective = test_images(category)
    inputs = [captured_inputs(model, images) for images in (held_out, good, defective)]
    held, test_good, test_defective = (image_scores(model, captured) for captured in inputs)
    row = {"model": name, "category": category, **made, "images": {"held_out_normal": len(held_out),
                                                                    "test_good": len(good),
                                                                    "test_defective": len(defective)}}
    for kind in ("own", "plain_max"):
        row[kind] = {"held_out_vs_test_good": auroc(held[kind], test_good[kind]),
                     "held_out_vs_test_defective": auroc(held[kind], test_defective[kind]),
                     "test_good_vs_test_defective": auroc(test_good[kind], test_defective[kind])}
    row["own_scores"] = {split: [round(float(v), 4) for v in scores["own"]] for split, scores in
                         (("held_out_normal", held), ("test_good", test_good), ("test_defective", test_defective))}
    row["peak_in_border_share"] = {"held_out_normal": round(float(held["peak_in_border"].mean()), 3),
                                   "test_good": round(float(test_good["peak_in_border"].mean()), 3),
                                   "test_defective": round(float(test_defective["peak_in_border"].mean()), 3)}
    row["candidates"] = candidate_aurocs(model, data, inputs)
    train_images = [image for batch in data.train_dataloader() for image in batch.image]
    splits = (("train", train_images), ("held_out_normal", held_out), ("test_good", good),
              ("test_defective", defective))
    for key, measure in (("background_brightness", background_brightness), ("part_centre_x", part_centre_x)):
        row[key] = {split: [round(float(np.mean(values)), 2), round(float(np.std(values)), 2)]
                    for split, values in ((split, measure(images)) for split, images in splits)}
    return row


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Do the test split's normal images score like held-out normal images? (failure analysis, test read)",
             "", f"`{command}`; machine: {cpu_model()}. AUROC of the image score between two sets of images; "
             "0.5 = indistinguishable. Own = the model's shipped image score; plain = the maximum of its "
             "unsmoothed map, without per-position statistics.", "",
             "| model | category | held-out normal vs test good (own / plain) | held-out normal vs test defective "
             "(own / plain) | test good vs test defective = test AUROC (own / plain) | peaks in the border band, "
             "held-out normal / test good | background brightness train / held-out / test good / test defective | "
             "part's horizontal centre, px, same order |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        own, plain = row["own"], row["plain_max"]
        cells = [f"{own[key]:.3f} / {plain[key]:.3f}" for key in
                 ("held_out_vs_test_good", "held_out_vs_test_defective", "test_good_vs_test_defective")]
        brightness, centre = (" / ".join(f"{mean:.1f}±{std:.1f}" for mean, std in row.get(key, {}).values())
                              for key in ("background_brightness", "part_centre_x"))
        border = row["peak_in_border_share"]
        lines.append(f"| {row['model']} | {row['category']} | {' | '.join(cells)} | "
                     f"{border['held_out_normal']:.2f} / {border['test_good']:.2f} | {brightness} | {centre} |")
    names = [name for name in rows[0].get("candidates", {}) if "smoothed" not in name or name.endswith("_s4")]
    if names:
        lines += ["", "Every image-score candidate of the selection scripts on the same images (per-position "
                  "statistics fitted on the training images; the map of every scale, while FastFlow's own score "
                  "takes its coarsest): test AUROC (test good vs test defective) / held-out normal vs test defective.",
                  "",
                  "| candidate | " + " | ".join(f"{r['model']} {r['category']}" for r in rows) + " |",
                  "|---|" + "---|" * len(rows)]
        for name in names:
            cells = [f"{r['candidates'][name]['test_good_vs_test_defective']:.3f} / "
                     f"{r['candidates'][name]['held_out_vs_test_defective']:.3f}" for r in rows]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def histogram_figure(rows: list[dict], path: Path) -> None:
    """One panel per model: the own image scores of held-out normal, test good and test defective images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.2), squeeze=False)
    for axis, row in zip(axes[0], rows, strict=True):
        values = row["own_scores"]
        bins = np.linspace(min(min(v) for v in values.values()), max(max(v) for v in values.values()), 25)
        for split, colour in (("held_out_normal", "tab:green"), ("test_good", "tab:blue"),
                              ("test_defective", "tab:red")):
            axis.hist(values[split], bins=bins, density=True, histtype="step", linewidth=2, color=colour,
                      label=f"{split.replace('_', ' ')} ({len(values[split])})")
        axis.set_title(f"{row['model']} on {row['category']}: own image score")
        axis.set_xlabel("image score (higher = more anomalous)")
    axes[0][0].set_ylabel("share of the images (density)")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--categories", nargs="+", default=list(DEFAULT_ROOTS), choices=list(DEFAULT_ROOTS))
    parser.add_argument("--checkpoints", type=Path, default=None, help="load DIR/<model>_<category>.ckpt")
    parser.add_argument("--max-minutes", type=float, default=5.0)
    args = parser.parse_args()
    shown = ["DIR" if a == str(args.checkpoints) else a for a in sys.argv[1:]]
    command = shlex.join(["python", "benchmarks/session_shift.py", *shown])
    for category in args.categories:
        rows = [analyse(name, category, args.checkpoints, args.max_minutes) for name in args.models]
        out = RESULTS / category / "session_shift"
        out.with_suffix(".json").write_text(json.dumps({"machine": cpu_model(), "command": command,
                                                        "results": rows}, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(rows, command))
        histogram_figure(rows, out.with_suffix(".png"))
        print(markdown(rows, command))


if __name__ == "__main__":
    main()
