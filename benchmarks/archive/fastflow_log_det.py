"""FastFlow: does the per-position log-det term help the anomaly map? Decided on validation data only.

Trains one FastFlow (the loss always contains the log-det), then for ``map_log_det`` in {False, True}
refits the normal-data statistics of the map with one eval pass over the training images and reports
validation metrics for each map blur. Validation = 20 % of train/good + anomalib's synthetic anomalies
(as in ``evaluate.py``). The setting with the best ``val_pixel_AUPRO`` (tie: ``val_pixel_AUROC``) is chosen
by that fixed rule; ``--test`` then runs the test set once, for the chosen setting only.

    python benchmarks/archive/fastflow_log_det.py --epochs 10 --blur 0 4 8 \
        --init backbone=efficientnet_lite0 --out benchmarks/results/bottle_fastflow_log_det.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from flowad_plugins import FastFlow


@torch.no_grad()
def refit_statistics(model: FastFlow, datamodule: MVTecAD) -> None:
    """Recompute the map's normal-data statistics with the trained model in eval mode."""
    model.eval()
    statistics = model.model.scorer.statistics
    statistics.reset()
    for batch in datamodule.train_dataloader():
        images = model.pre_processor.transform(batch.image)
        for scale, (z, log_det) in enumerate(model.model.flow_outputs(images)):
            statistics.update(scale, model.model.log_likelihood_map(z, log_det))
    statistics.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blur", type=float, nargs="+", default=[0.0, 4.0, 8.0])
    parser.add_argument("--init", nargs="*", default=[], help="FastFlow init args key=yaml_value")
    parser.add_argument("--test", action="store_true", help="test once with the setting chosen on validation")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    seed_everything(args.seed, workers=True)
    init = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.init)}
    model = FastFlow(**init)
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, num_workers=2, val_split_mode="synthetic",
                         val_split_ratio=0.2, seed=args.seed)
    engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                    default_root_dir="results_tmp")
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start

    validation: dict[str, dict[str, float]] = {}
    for map_log_det in (False, True):
        model.model.map_log_det = map_log_det
        refit_statistics(model, datamodule)
        for sigma in args.blur:
            model.model.scorer.blur_sigma = sigma
            metrics = engine.validate(model=model, datamodule=datamodule, verbose=False)[0]
            validation[f"map_log_det={map_log_det},blur_sigma={sigma:g}"] = {k: round(float(v), 4)
                                                                             for k, v in metrics.items()}
            print(map_log_det, sigma, validation[f"map_log_det={map_log_det},blur_sigma={sigma:g}"], flush=True)
    chosen = max(validation, key=lambda k: (validation[k]["val_pixel_AUPRO"], validation[k]["val_pixel_AUROC"]))
    test_metrics: dict[str, float] = {}
    if args.test:
        log_det_part, blur_part = chosen.split(",")
        model.model.map_log_det = log_det_part.endswith("True")
        refit_statistics(model, datamodule)
        model.model.scorer.blur_sigma = float(blur_part.split("=")[1])
        # thresholds/normalisation of the post-processor come from validation with the chosen setting
        engine.validate(model=model, datamodule=datamodule, verbose=False)
        test_metrics = {k: round(float(v), 4)
                        for k, v in engine.test(model=model, datamodule=datamodule, verbose=False)[0].items()}
    result = {"model": "FastFlow", "init": init, "category": args.category, "epochs": args.epochs, "seed": args.seed,
              "train_seconds": round(train_seconds, 1), "validation": validation, "chosen_on_validation": chosen,
              "test_metrics": test_metrics,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
