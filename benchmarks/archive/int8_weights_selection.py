"""Which weights ``CompressionType.INT8`` compresses, chosen on synthetic anomalies from normal training images.

For each trained checkpoint (256 px IR, OpenVINO f32 hint): the mean of image and pixel AUROC on a validation set made
only of normal *training* images, every other one given a synthetic anomaly by anomalib's ``PerlinAnomalyGenerator``
(seeded), for the float IR, every weight compressed (``nncf.compress_weights``), and only the flow head's weights
(``flowad_plugins.export.compress_flow_weights``, what ships). The bottle test AUROCs are printed next to it for the
record; the choice was made on the validation column.

    python benchmarks/archive/int8_weights_selection.py CflowAD=path.ckpt FastFlow=path.ckpt CSFlow=path.ckpt \\
        --out benchmarks/results/int8_weights_selection
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import nncf
import numpy as np
import openvino as ov
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from sklearn.metrics import roc_auc_score
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness, evaluate, export_parity
import export_parity as ep
from harness.machine import cpu_model

import flowad_plugins
from flowad_plugins import export as fe


def synthetic_validation(datamodule: MVTecAD, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image 1×3×S×S, mask S×S)`` from the normal training images; odd ones get a Perlin anomaly."""
    items = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generator = PerlinAnomalyGenerator(probability=1.0)  # draws its solarize threshold when built
        datamodule.setup("fit")
        for index, item in enumerate(datamodule.train_data):  # MVTec's training images are all normal
            image = TF.resize(item.image[None], [size, size], antialias=True)
            mask = torch.zeros(size, size, dtype=torch.bool)
            if index % 2:
                anomalous, anomaly = generator(image[0])
                image, mask = anomalous[None].clamp(0, 1), anomaly[0] > 0.5
            items.append((image.float().numpy(), mask.numpy()))
    return items


def mean_auroc(compiled: ov.CompiledModel, items: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """(image AUROC + pixel AUROC) / 2 of an IR on validation ``items``."""
    scores, maps = [], []
    for image, mask in items:
        result = compiled(image)
        scores.append(float(np.asarray(result["pred_score"]).reshape(-1)[0]))
        maps.append(np.asarray(result["anomaly_map"]).reshape(mask.shape))
    masks = np.stack([mask for _, mask in items])
    labels = masks.reshape(len(masks), -1).any(axis=1)
    return float(roc_auc_score(labels, scores) + roc_auc_score(masks.ravel(), np.stack(maps).ravel())) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", nargs="+", help="Model=path/to/model.ckpt")
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_weights_selection"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    size, core, rows = args.image_size, ov.Core(), []
    for item in args.ckpt:
        name, path = item.split("=", 1)
        model = getattr(flowad_plugins, name).load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
        datamodule = MVTecAD(root=args.root, category="bottle", train_batch_size=8, eval_batch_size=8, num_workers=0,
                             val_split_mode="synthetic", val_split_ratio=0.2, seed=0)
        validation = synthetic_validation(datamodule, size)
        images, masks, labels = ep.load_test_set(datamodule, size)
        with TemporaryDirectory() as folder:
            onnx_path = fe.export_model(model, "onnx", folder, input_size=(size, size))
            variants = {
                "float": lambda m: m,
                "all weights INT8": nncf.compress_weights,
                "flow head INT8 (ships)": lambda m, model=model: fe.compress_flow_weights(model, m),
            }
            for variant, compress in variants.items():
                ir = compress(ov.convert_model(onnx_path))
                compiled = core.compile_model(ir, "CPU", fe.openvino_config("f32", 2))

                def run(x: torch.Tensor, compiled=compiled) -> dict[str, np.ndarray]:
                    return {port.any_name: np.asarray(value) for port, value in compiled(x.numpy()).items()}

                test = ep.evaluate(ep.batched(run, images, 8), None, masks, labels)
                row = {"model": name, "variant": variant,
                       "validation_mean_auroc": round(mean_auroc(compiled, validation), 4),
                       "test_image_AUROC": test["image_AUROC"], "test_pixel_AUROC": test["pixel_AUROC"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"rows": rows, "machine": {"cpu": cpu_model(), "threads": 2},
              "command": "python benchmarks/archive/int8_weights_selection.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# INT8 weight compression: which weights (chosen on synthetic validation)", "",
             f"`{result['command']}`", "", "Validation: normal bottle *training* images, every other one with a "
             "synthetic Perlin anomaly; metric = (image AUROC + pixel AUROC) / 2. Test columns: the 83 bottle test "
             "images, for the record only. OpenVINO f32 hint, 256 px.", "",
             "| model | variant | validation mean AUROC | test image AUROC | test pixel AUROC |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['validation_mean_auroc']:.4f} | {r['test_image_AUROC']:.4f} | "
              f"{r['test_pixel_AUROC']:.4f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
