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
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torch import nn

from flowad_plugins.bench.machine import cpu_model as cpu_name
from flowad_plugins.bench.timing import wall_times

ANOMALIB_FASTFLOW_BACKBONES = {"resnet18", "wide_resnet50_2", "cait_m48_448", "deit_base_distilled_patch16_384"}


class _FeatureDict(nn.Module):
    """``images -> {key: trunk(images)}``: stands in for anomalib's ``TimmFeatureExtractor`` in Csflow."""

    def __init__(self, trunk: nn.Module, key: str) -> None:
        super().__init__()
        self.trunk, self.key = trunk, key

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key: self.trunk(images)}


def _anomalib_pre_processor(backbone: str, image_size: int, backbone_weights=None):
    """anomalib's resize + normalise, with the mean/std the backbone's weights were trained with.

    Our extractors convert anomalib's ImageNet normalisation to the weights' own internally
    (``flowad_plugins.backbones``); anomalib's don't, so their pre-processor gets it directly.
    """
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from flowad_plugins.backbones import backbone_input_normalization

    norm = backbone_input_normalization(backbone, True, backbone_weights)
    return PreProcessor(transform=Compose([Resize((image_size, image_size), antialias=True),
                                           Normalize(mean=list(norm.mean), std=list(norm.std))]))


def _build_anomalib_model(name: str, init: dict, image_size: int):
    """anomalib's built-in ``name`` on ``init["backbone"]`` with our offline weights.

    anomalib's extractors would download ImageNet weights (impossible offline): they are built without,
    then get the same weights our models use. Where anomalib hard-codes its backbone, the same backbone as
    ours is swapped in (settings recorded in the result): Fastflow accepts only four names, so another timm
    CNN gets its first three stages through the same ``features_only`` call; Csflow always builds
    torchvision's EfficientNet-B5 (features.6.8, 304 channels, stride 32), so it gets the backbone's last
    stride-32 stage before the head (``efficientnet_lite0``: blocks.5, 192 channels) with its flow inputs
    sized to match.
    """
    from unittest import mock

    import timm
    import torchvision
    from anomalib.models import get_model
    from anomalib.models.image.csflow import torch_model as anomalib_csflow

    from flowad_plugins.backbones import _create_timm_model, load_backbone_weights

    short = name.removeprefix("anomalib.")
    init = dict(init)
    backbone = init.pop("backbone")
    weights = init.pop("backbone_weights", None)
    if short.lower() == "csflow":
        full = _create_timm_model(backbone, True, weights)
        trunk = nn.Sequential(full.conv_stem, full.bn1, *full.blocks[:-1]).eval().requires_grad_(False)
        channels = trunk(torch.zeros(1, 3, 64, 64)).shape[1]

        def random_b5(*_, **kwargs):
            kwargs.pop("weights", None)
            return torchvision.models.efficientnet_b5(weights=None, **kwargs)

        real_input_node = anomalib_csflow.InputNode
        with mock.patch.object(anomalib_csflow, "efficientnet_b5", random_b5), \
                mock.patch.object(anomalib_csflow, "InputNode",
                                  lambda _c, *dims, **kw: real_input_node(channels, *dims, **kw)):
            model = get_model(short, **init)
        model.model.feature_extractor.feature_extractor = _FeatureDict(trunk, "features.6.8")
        return model
    if short.lower() == "fastflow" and backbone not in ANOMALIB_FASTFLOW_BACKBONES:
        real_create = timm.create_model
        with mock.patch.object(timm, "create_model", lambda _name, **kw: real_create(backbone, **kw)):
            model = get_model(short, **{**init, "backbone": "resnet18", "pre_trained": False})
    else:
        model = get_model(short, **{**init, "backbone": backbone, "pre_trained": False})
    extractor = model.model.feature_extractor if hasattr(model.model, "feature_extractor") else model.model.encoder
    load_backbone_weights(getattr(extractor, "feature_extractor", extractor), backbone, backbone_weights=weights)
    return model


def build_model(name: str, init: dict, keep_anomalib_post_processor: bool = False, image_size: int = 256):
    """Our class by name, or ``anomalib.<Name>`` for anomalib's built-in model.

    anomalib's built-ins get our evaluator (AUPRO, ``val_*``) and our rank-preserving ``FlowPostProcessor``
    unless asked otherwise: anomalib's default clamps normalised scores to [0, 1] with the validation range,
    which creates ties and biases AUROC/AUPRO downwards; the same post-processor for every model keeps the
    comparison fair.
    """
    if name.startswith("anomalib."):
        from flowad_plugins.models.common import FlowAnomalibModule
        from flowad_plugins.post_processing import FlowPostProcessor

        extra = {"evaluator": FlowAnomalibModule.configure_evaluator(),
                 "pre_processor": _anomalib_pre_processor(init["backbone"], image_size, init.get("backbone_weights"))}
        if not keep_anomalib_post_processor:
            extra["post_processor"] = FlowPostProcessor()
        return _build_anomalib_model(name, {**init, **extra}, image_size)
    import flowad_plugins

    model_class = getattr(flowad_plugins, name)
    return model_class(**init, pre_processor=model_class.configure_pre_processor((image_size, image_size)))


def measure_throughput(model: torch.nn.Module, image_size: int, batch_size: int = 8, repeats: int = 5,
                       autocast: str = "32") -> dict:
    """Torch eager CPU inference of the trained torch model on a ``batch_size`` batch: median ms and img/s.

    ``autocast="bf16-mixed"`` times it under CPU bf16 autocast, as Lightning runs it with that precision.
    """
    model.eval()
    images = torch.randn(batch_size, 3, image_size, image_size)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16-mixed"):
        times = wall_times(lambda: model(images), warmup=2, min_repeats=repeats, max_repeats=repeats)
    median = statistics.median(times)
    return {"batch_size": batch_size, "median_ms": round(1000 * median, 1),
            "images_per_second": round(batch_size / median, 1), "load_average_1min": round(os.getloadavg()[0], 2)}


def save_defect_maps(model, datamodule, path: Path, per_defect: int = 2) -> None:
    """Post-processed anomaly maps (threshold at 0.5) of the first ``per_defect`` test images of each defect type.

    Saved as ``.npz`` (images, maps, masks, names at the model's input size) for ``benchmarks/maps_figure.py``.
    """
    import numpy as np
    from torch.nn import functional as F

    dataset = datamodule.test_data
    chosen, seen = [], {}
    for index, image_path in enumerate(dataset.samples.image_path):
        defect = Path(image_path).parent.name
        if defect != "good" and seen.get(defect, 0) < per_defect:
            seen[defect] = seen.get(defect, 0) + 1
            chosen.append(index)
    items = [dataset[i] for i in chosen]
    images = torch.stack([item.image for item in items])
    masks = torch.stack([item.gt_mask.float().reshape(item.image.shape[-2:]) for item in items])
    model.eval()
    with torch.inference_mode():
        output = model(images)
    maps = output.anomaly_map.reshape(len(items), 1, *output.anomaly_map.shape[-2:]).float()
    size = maps.shape[-2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        images=F.interpolate(images, size=size, mode="bilinear", antialias=True).clamp(0, 1).numpy(),
        maps=maps[:, 0].numpy(),
        masks=F.interpolate(masks[:, None], size=size, mode="nearest")[:, 0].numpy(),
        names=np.array([f"{Path(dataset.samples.image_path.iloc[i]).parent.name}/"
                        f"{Path(dataset.samples.image_path.iloc[i]).stem}" for i in chosen]),
    )




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CflowAD", help="flowad_plugins class or anomalib.<Name>")
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="also stop training after this much wall time (the CPU budget; epochs run are recorded)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", nargs="*", default=[], help="model init args key=yaml_value")
    parser.add_argument("--blur-sweep", type=float, nargs="*", default=[],
                        help="after training, also report validation metrics for these map blur sigmas")
    parser.add_argument("--keep-anomalib-post-processor", action="store_true",
                        help="evaluate anomalib's models with their own clamping post-processor")
    parser.add_argument("--skip-test", action="store_true", help="validation metrics only (for model selection)")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"],
                        help="Lightning precision for training and evaluation (16-mixed needs CUDA)")
    parser.add_argument("--rescore-checkpoint", nargs=2, type=Path, metavar=("CKPT", "RESULT_JSON"), default=None,
                        help="skip training: load the checkpoint a run of this command wrote (same arguments) and "
                             "re-evaluate it with the current inference code; train time is taken from its JSON")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    parser.add_argument("--save-checkpoint", type=Path, default=None,
                        help="write the trained model's checkpoint here (for --rescore-checkpoint)")
    parser.add_argument("--save-maps", type=Path, default=None,
                        help=".npz of post-processed maps on a few defective test images (for the figure)")
    args = parser.parse_args()

    seed_everything(args.seed, workers=True)
    init = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.init)}
    model = build_model(args.model, init, args.keep_anomalib_post_processor, args.image_size)
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
    budget = {"max_time": {"minutes": args.max_minutes}} if args.max_minutes else {}
    engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                    default_root_dir="results_tmp", precision=args.precision, **budget)
    if args.rescore_checkpoint:  # inference-side change only: reuse the trained weights and statistics
        rescored_from = json.loads(args.rescore_checkpoint[1].read_text())
        # into the model built above (building another would consume random numbers and change the synthetic
        # validation anomalies, which the datamodule draws from the global generator at setup)
        checkpoint = torch.load(args.rescore_checkpoint[0], map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])
        engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        default_root_dir="results_tmp", precision=args.precision)
        train_seconds = rescored_from["train_seconds"]
    else:
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        train_seconds = time.perf_counter() - start
        if args.save_checkpoint:
            args.save_checkpoint.parent.mkdir(parents=True, exist_ok=True)
            engine.trainer.save_checkpoint(args.save_checkpoint)
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
        **({"max_minutes": args.max_minutes, "epochs_run": engine.trainer.current_epoch} if args.max_minutes else {}),
        "seed": args.seed,
        "precision": args.precision,
        "train_seconds": round(train_seconds, 1),
        **({"rescored_checkpoint_of": str(args.rescore_checkpoint[1])} if args.rescore_checkpoint else {}),
        **validation,
        "test_metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "torch_cpu_inference": measure_throughput(model.model, args.image_size, autocast=args.precision),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()]},
        "command": "python benchmarks/evaluate.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.save_maps and not args.skip_test:
        save_defect_maps(model, datamodule, args.save_maps)


if __name__ == "__main__":
    main()
