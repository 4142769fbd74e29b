"""Train and test one model on an MVTec-format category with the no-test-leakage protocol.

Protocol: validation = 20 % of train/good (+ anomalib's synthetic anomalies made from them), so
thresholds and normalisation never see the test set; a fixed epoch budget (no early stopping, no
model selection on test). Prints and (with --out) saves train time and test metrics.

    python benchmarks/evaluate.py --model CflowAD --epochs 3 \
        --init backbone=efficientnet_lite0 layers='["blocks.2","blocks.4"]'
    python benchmarks/evaluate.py --config configs/cflow_ad_efficientnet_lite0.yaml --max-minutes 5

``--config`` takes the model class, its ``init_args`` and ``trainer.max_epochs`` from a shipped config (``--init``
and ``--epochs`` still override them) at the class's default input size unless ``--image-size`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from anomalib.engine import Engine
from harness.datasets import validation_split_datamodule
from harness.machine import machine_info
from harness.models import build_model, default_input_side
from harness.timing import median_latencies_ms
from lightning.pytorch import seed_everything


def load_checkpoint_safely(path: Path) -> dict:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)`` (tensors and plain containers only).

    Our models' checkpoints hold no other objects; a file that needs one (e.g. written by an older version) fails
    with the global it asked for, instead of running arbitrary pickled code.
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        msg = (f"--rescore-checkpoint {path}: not loadable with weights_only=True ({str(error).strip()[:400]}). "
               "Re-save it from a trusted session (state_dict only), or allow the named class with "
               "torch.serialization.add_safe_globals if you trust the file.")
        raise SystemExit(msg) from error


def measure_throughput(model: torch.nn.Module, image_size: int, batch_size: int = 8, repeats: int = 5,
                       autocast: str = "32") -> dict:
    """Torch eager CPU inference of the trained torch model on a ``batch_size`` batch: median ms and img/s.

    ``autocast="bf16-mixed"`` times it under CPU bf16 autocast, as Lightning runs it with that precision.
    """
    model.eval()
    images = torch.randn(batch_size, 3, image_size, image_size)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16-mixed"):
        (latency,) = median_latencies_ms([lambda: model(images)], warmup=2, repeats=repeats)
    return {"batch_size": batch_size, "median_ms": round(latency, 1),
            "images_per_second": round(1000 * batch_size / latency, 1),
            "load_average_1min": round(os.getloadavg()[0], 2)}


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

def argument_parser() -> argparse.ArgumentParser:
    """This script's command line (``accuracy_table.py`` builds rows of it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CflowAD", help="flowad_plugins class or anomalib.<Name>")
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle",
                        help="an MVTec-format category under --root, or 'generated': the embedded generated data "
                             "(flowad_plugins.data.SyntheticAD, written to a temporary folder; --root unused)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a configs/*.yaml: model class, init_args and max_epochs (instead of --model)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input side (default: 256, or the config's model default)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 3, or the config's trainer.max_epochs")
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
    return parser


def main() -> None:
    args = argument_parser().parse_args()

    seed_everything(args.seed, workers=True)
    init = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.init)}
    if args.config is not None:
        config = yaml.safe_load(args.config.read_text())
        args.model = config["model"]["class_path"].rsplit(".", 1)[-1]
        init = {**config["model"].get("init_args", {}), **init}
        args.epochs = args.epochs or int(config.get("trainer", {}).get("max_epochs", 3))
    args.epochs = args.epochs or 3
    image_size = args.image_size or default_input_side(args.model)
    model = build_model(args.model, init, image_size,
                        keep_anomalib_post_processor=args.keep_anomalib_post_processor)
    datamodule = validation_split_datamodule(args.category, args.batch_size, root=args.root, num_workers=2,
                                             seed=args.seed)
    budget = {"max_time": {"minutes": args.max_minutes}} if args.max_minutes else {}
    engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                    default_root_dir="results_tmp", precision=args.precision, **budget)
    if args.rescore_checkpoint:  # inference-side change only: reuse the trained weights and statistics
        rescored_from = json.loads(args.rescore_checkpoint[1].read_text())
        # into the model built above (building another would consume random numbers and change the synthetic
        # validation anomalies, which the datamodule draws from the global generator at setup)
        checkpoint = load_checkpoint_safely(args.rescore_checkpoint[0])
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
        "image_size": image_size,
        "epochs": args.epochs,
        **({"max_minutes": args.max_minutes, "epochs_run": engine.trainer.current_epoch} if args.max_minutes else {}),
        "seed": args.seed,
        "precision": args.precision,
        "train_seconds": round(train_seconds, 1),
        **({"rescored_checkpoint_of": str(args.rescore_checkpoint[1])} if args.rescore_checkpoint else {}),
        **validation,
        "test_metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "torch_cpu_inference": measure_throughput(model.model, image_size, autocast=args.precision),
        "machine": {**machine_info(torch.get_num_threads()), "torch": torch.__version__},
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
