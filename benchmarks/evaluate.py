"""Train and test one model on an MVTec-format category with the no-test-leakage protocol.

Protocol: validation = 20 % of train/good (+ anomalib's synthetic anomalies made from them), so
thresholds and normalisation never see the test set; a fixed epoch budget (no early stopping, no
model selection on test). Prints and (with --out) saves train time and test metrics.

    python benchmarks/evaluate.py --model CflowAD --epochs 3 \
        --init backbone=efficientnet_lite0 layers='["blocks.2","blocks.4"]'
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


def build_model(name: str, init: dict, keep_anomalib_post_processor: bool = False):
    """Our class by name, or ``anomalib.<Name>`` for anomalib's built-in model.

    anomalib's built-ins get our rank-preserving ``FlowPostProcessor`` unless asked otherwise: anomalib's
    default clamps normalised scores to [0, 1] with the validation range, which creates ties and biases
    AUROC/AUPRO downwards; the same post-processor for every model keeps the comparison fair.
    """
    if name.startswith("anomalib."):
        from anomalib.models import get_model

        from flowad_plugins.backbones import load_backbone_weights
        from flowad_plugins.models.common import FlowAnomalibModule
        from flowad_plugins.post_processing import FlowPostProcessor

        init = {**init, "evaluator": FlowAnomalibModule.configure_evaluator()}  # same metrics (AUPRO, val_*)
        if not keep_anomalib_post_processor:
            init = {**init, "post_processor": FlowPostProcessor()}
        # anomalib's extractor would download ImageNet weights (impossible offline): build it without, then load
        # the same weights our models use (offline package or --init backbone_weights=...).
        weights = init.pop("backbone_weights", None)
        model = get_model(name.removeprefix("anomalib."), **{**init, "pre_trained": False})
        extractor = model.model.feature_extractor if hasattr(model.model, "feature_extractor") else model.model.encoder
        load_backbone_weights(getattr(extractor, "feature_extractor", extractor), init["backbone"],
                              backbone_weights=weights)
        return model
    import flowad_plugins

    return getattr(flowad_plugins, name)(**init)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CflowAD", help="flowad_plugins class or anomalib.<Name>")
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", nargs="*", default=[], help="model init args key=yaml_value")
    parser.add_argument("--blur-sweep", type=float, nargs="*", default=[],
                        help="after training, also report validation metrics for these map blur sigmas")
    parser.add_argument("--keep-anomalib-post-processor", action="store_true",
                        help="evaluate anomalib's models with their own clamping post-processor")
    parser.add_argument("--skip-test", action="store_true", help="validation metrics only (for model selection)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    seed_everything(args.seed, workers=True)
    init = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.init)}
    model = build_model(args.model, init, args.keep_anomalib_post_processor)
    if args.image_size != 256:
        model.pre_processor = model.configure_pre_processor((args.image_size, args.image_size))
    datamodule = MVTecAD(
        root=args.root,
        category=args.category,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=2,
        val_split_mode="synthetic",
        val_split_ratio=0.2,
        seed=args.seed,
    )
    engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                    default_root_dir="results_tmp")
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    validation = {}
    for sigma in args.blur_sweep or [None]:
        if sigma is not None:
            model.model.scorer.blur_sigma = sigma
        key = "validation" if sigma is None else f"validation_blur_{sigma:g}"
        validation[key] = {k: round(float(v), 4) for k, v in engine.validate(model=model, datamodule=datamodule,
                                                                              verbose=False)[0].items()}
    if args.blur_sweep:  # choose the map smoothing on VALIDATION localisation metrics only
        best = max(args.blur_sweep, key=lambda sigma: sum(
            validation[f"validation_blur_{sigma:g}"].get(k, 0.0) for k in ("val_pixel_AUROC", "val_pixel_AUPRO")))
        model.model.scorer.blur_sigma = best
        validation["chosen_blur_sigma"] = best
    metrics = {} if args.skip_test else engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    result = {
        "model": args.model,
        "init": init,
        "category": args.category,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_seconds": round(train_seconds, 1),
        **validation,
        "test_metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
