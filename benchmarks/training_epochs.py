r"""Where a training epoch's time goes: optimizer steps, validation, and the end-of-validation metrics.

Trains a shipped config for ``--epochs`` epochs on a category (validation = 20 % of train/good + synthetic
anomalies, seed 0, the data loading of ``evaluate.py``) and times every epoch, in three variants run one after the
other in this process:

- ``shipped``: the package as it is: the frozen backbone's features of each training image computed once per fit
  (``backbones.feature_cache``) and pixel-level validation metrics at the last validation only
  (``models.evaluation``);
- ``no_feature_cache``: the same with the cache switched off (``max_bytes=0``: every image is recomputed);
- ``pixel_metrics_every_epoch``: the same with anomalib's plain ``Evaluator`` (pixel AUROC and AUPRO at every
  validation).

Epoch 0 fills the cache, so the figures that show it are the later epochs. The last epoch also holds the
per-position statistics pass and every pixel metric. Writes ``--out`` (``.json`` and ``.md``)::

    OMP_NUM_THREADS=2 python benchmarks/training_epochs.py --config configs/csflow_efficientnet_lite0.yaml \
        --batch-size 8 --out benchmarks/results/training_epochs_csflow.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import Evaluator
from lightning.pytorch import Callback, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.machine import machine_info

import flowad_plugins

VARIANTS = ("shipped", "no_feature_cache", "pixel_metrics_every_epoch")


class EpochClock(Callback):
    """Per epoch: seconds in optimizer steps, in the validation loop, in the end-of-validation hooks, in all."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start, self.steps = time.perf_counter(), 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += time.perf_counter() - self.batch_start

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.validation_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.validation_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        cache = pl_module.model.encoder.cache
        self.epochs.append({"epoch": trainer.current_epoch, "total_s": round(now - self.start, 1),
                            "steps_s": round(self.steps, 1),
                            "validation_loop_s": round(self.validation_end - self.validation_start, 1),
                            "after_validation_s": round(now - self.validation_end, 1),
                            "cache_hits": cache.hits, "cache_misses": cache.misses})


def run_variant(variant: str, config: dict, args: argparse.Namespace) -> dict:
    """One fit of the config in ``variant``; its per-epoch clock and final training loss."""
    seed_everything(0, workers=True)
    init = {k: v for k, v in config["model"]["init_args"].items() if k != "seed"}
    model_class = getattr(flowad_plugins, config["model"]["class_path"].rsplit(".", 1)[-1])
    model = model_class(**init)
    if variant == "no_feature_cache":
        model.model.encoder.cache.max_bytes = 0
    if variant == "pixel_metrics_every_epoch":
        shipped = model.evaluator
        model.evaluator = Evaluator(val_metrics=list(shipped.val_metrics), test_metrics=list(shipped.test_metrics))
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, num_workers=2, val_split_mode="synthetic",
                         val_split_ratio=0.2, seed=0)
    clock = EpochClock()
    engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, callbacks=[clock],
                    default_root_dir="results_tmp", enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    return {"variant": variant, "fit_s": round(time.perf_counter() - start, 1), "epochs": clock.epochs,
            "train_loss": round(float(engine.trainer.callback_metrics["train_loss"]), 5),
            "image_threshold": float(model.post_processor.image_threshold)}


def markdown(result: dict) -> str:
    lines = [f"# Training epochs of {result['model']} on {result['category']}", "",
             f"`{result['command']}`; machine: {result['machine']['cpu']} (ISA: "
             f"{', '.join(k for k, v in result['machine']['isa_flags'].items() if v) or 'none listed'}), "
             f"{result['machine']['threads']} threads.", "",
             "| variant | epoch | total s | optimizer steps s | validation loop s | after validation s | "
             "cache hits / misses |", "|---|---:|---:|---:|---:|---:|---|"]
    for run in result["runs"]:
        for epoch in run["epochs"]:
            lines.append(f"| {run['variant']} | {epoch['epoch']} | {epoch['total_s']} | {epoch['steps_s']} | "
                         f"{epoch['validation_loop_s']} | {epoch['after_validation_s']} | "
                         f"{epoch['cache_hits']} / {epoch['cache_misses']} |")
    lines += ["", "Same weights in every variant: final training loss " + ", ".join(
        f"{run['variant']} {run['train_loss']}" for run in result["runs"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not Path(args.root, args.category).is_dir():
        sys.exit(f"--root/--category: no data under {Path(args.root, args.category)}.")
    config = yaml.safe_load(args.config.read_text())
    runs = [run_variant(variant, config, args) for variant in args.variants]
    command = "python benchmarks/training_epochs.py " + " ".join(sys.argv[1:])
    result = {"model": config["model"]["class_path"].rsplit(".", 1)[-1], "category": args.category,
              "command": command, "machine": machine_info(torch.get_num_threads()), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
