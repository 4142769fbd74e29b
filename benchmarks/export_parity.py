"""Export parity on an MVTec category: torch vs ONNX Runtime vs OpenVINO (FP32, FP16, INT8 weights), per model.

For each trained checkpoint the model is exported once to ONNX with anomalib's ``to_onnx`` (static 256×256,
dynamic batch; pre- and post-processor in the graph); the OpenVINO variants are made from that file exactly
as anomalib's ``to_openvino`` does (``ov.convert_model``, then the model's INT8 flow-head weight compression,
``compress_flow_weights``, and ``compress_to_fp16`` for FP16). Every
variant runs the whole test set (images resized to 256 px as the pre-processor does, masks nearest) and is
compared with torch:

- ``map_max_abs_rel``: max |map − torch map| over all test pixels, divided by the torch map's range.
- ``labels_identical``: predicted image labels equal to torch's for every test image (and the count that differ).
- image / pixel AUROC and their difference from torch's.
- OpenVINO runs twice: ``INFERENCE_PRECISION_HINT=f32`` (FP32 parity) and the CPU plugin's default precision
  (bf16 on CPUs with AVX512-BF16/AMX), labelled ``default``.
- Latency: batch 1, median of ``--repeats`` runs after warm-up, ``--threads`` CPU threads; file size on disk.

Tolerances: FP32 max |Δmap| ≤ 1e-3 of the range and identical labels; FP16 / INT8 image and pixel AUROC
within 0.005 of torch. Results: ``--out``.json and .md.

    python benchmarks/export_parity.py --ckpt CflowAD=path/model.ckpt FastFlow=... CSFlow=... \\
        --out benchmarks/results/export_parity
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from anomalib.data import MVTecAD
from harness.machine import machine_info
from harness.models import load_checkpoint
from harness.timing import median_latencies_ms
from rich.progress import track
from sklearn.metrics import roc_auc_score
from torchvision.transforms.v2 import functional as TF

from flowad_plugins.export import compress_flow_weights, export_model, openvino_config

FP32_MAP_TOLERANCE = 1e-3
AUROC_TOLERANCE = 0.005
VARIANTS = ("fp32", "fp16", "int8")
HINTS = ("f32", "default")




def load_test_set(datamodule: MVTecAD, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Test images ``N×3×S×S`` (antialiased bilinear, as the pre-processor), masks ``N×S×S``, labels ``N``."""
    datamodule.setup("test")
    images, masks, labels = [], [], []
    for item in track(datamodule.test_data, description="loading test images"):
        images.append(TF.resize(item.image, [size, size], antialias=True))
        mask = item.gt_mask if item.gt_mask is not None else torch.zeros(item.image.shape[-2:])
        masks.append(TF.resize(mask[None].float(), [size, size], interpolation=TF.InterpolationMode.NEAREST)[0])
        labels.append(int(item.gt_label))
    return torch.stack(images), torch.stack(masks) > 0.5, torch.tensor(labels)


def batched(run, images: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Run ``run(batch) -> {name: array}`` over ``images`` in batches; concatenate per output."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        for name, value in run(images[start : start + batch_size]).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def latency_ms(run, image: torch.Tensor, repeats: int, warmup: int = 5) -> float:
    """Median wall time (ms) of ``run(image)`` over ``repeats`` calls after ``warmup``."""
    (latency,) = median_latencies_ms([lambda: run(image)], warmup=warmup, repeats=repeats)
    return round(latency, 2)


def _image_maps(maps: np.ndarray) -> np.ndarray:
    """``B×H×W`` anomaly maps from ours (``B×1×H×W``) or anomalib's (``B×H×W``)."""
    return maps[:, 0] if maps.ndim == 4 else maps


def evaluate(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None, masks: torch.Tensor,
             labels: torch.Tensor) -> dict:
    """AUROCs of ``outputs`` and, given the torch ``reference``, their parity figures."""
    scores, maps = outputs["pred_score"].reshape(-1), _image_maps(outputs["anomaly_map"])
    result = {
        "image_AUROC": round(float(roc_auc_score(labels.numpy(), scores)), 5),
        "pixel_AUROC": round(float(roc_auc_score(masks.numpy().ravel(), maps.ravel())), 5),
        "false_alarms": int(outputs["pred_label"].reshape(-1).astype(bool)[~labels.numpy().astype(bool)].sum()),
        "normal_images": int((~labels.numpy().astype(bool)).sum()),
    }
    if reference is not None:
        reference_maps = _image_maps(reference["anomaly_map"])
        map_range = float(reference_maps.max() - reference_maps.min())
        label_differences = int((outputs["pred_label"].reshape(-1).astype(bool)
                                 != reference["pred_label"].reshape(-1).astype(bool)).sum())
        result.update({
            "map_max_abs_rel": float(np.abs(maps.astype(np.float64) - reference_maps).max() / map_range),
            "score_max_abs": float(np.abs(scores.astype(np.float64) - reference["pred_score"].reshape(-1)).max()),
            "labels_identical": label_differences == 0,
            "label_differences": label_differences,
        })
    return result


def check(row: dict, torch_row: dict) -> dict:
    """Pass/fail of a row against the tolerance for its variant (FP32: map + labels; else: AUROC)."""
    row["image_AUROC_delta"] = round(row["image_AUROC"] - torch_row["image_AUROC"], 5)
    row["pixel_AUROC_delta"] = round(row["pixel_AUROC"] - torch_row["pixel_AUROC"], 5)
    if row["weights"] == "fp32" and row["precision"] in {"f32", "onnxruntime"}:
        row["tolerance"] = f"map ≤ {FP32_MAP_TOLERANCE} of range, identical labels"
        row["passes"] = bool(row["map_max_abs_rel"] <= FP32_MAP_TOLERANCE and row["labels_identical"])
    else:
        row["tolerance"] = f"|Δ AUROC| ≤ {AUROC_TOLERANCE}"
        row["passes"] = bool(abs(row["image_AUROC_delta"]) <= AUROC_TOLERANCE
                             and abs(row["pixel_AUROC_delta"]) <= AUROC_TOLERANCE)
    return row


def openvino_variant(model, onnx_path: Path, variant: str, path: Path) -> None:
    """IR for ``variant`` made from ``onnx_path`` as ``to_openvino`` does, saved as ``path`` (.xml)."""
    import openvino as ov

    from flowad_plugins.export.onnx_graph import flow_head_names
    from flowad_plugins.export.precision import keep_precision_critical_in_float32

    ov_model = ov.convert_model(onnx_path)
    if variant == "int8":
        ov_model = compress_flow_weights(model, ov_model, onnx_path)
    ov.save_model(ov_model, path, compress_to_fp16=variant == "fp16")
    # as to_openvino does: backbone and score tail stay float32 at the CPU's default precision
    size = ov_model.input(0).get_partial_shape()[2:]
    keep_precision_critical_in_float32(path, flow_head_names(model, onnx_path, [int(str(side)) for side in size]))


def run_model(name: str, checkpoint: Path, args: argparse.Namespace) -> dict:
    import onnxruntime as ort
    import openvino as ov

    model = load_checkpoint(name, checkpoint)
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=8, eval_batch_size=8,
                         num_workers=0, val_split_mode="synthetic", val_split_ratio=0.2, seed=args.seed)
    images, masks, labels = load_test_set(datamodule, args.image_size)
    sample = images[:1]
    with torch.no_grad():
        reference = batched(lambda x: {k: v.numpy() for k, v in model(x)._asdict().items() if v is not None},
                            images, args.batch_size)
    reference = {k: v.astype(np.float64) if v.dtype != bool else v for k, v in reference.items()}
    torch_row = {"runtime": "torch", "weights": "fp32", "precision": "torch",
                 **evaluate(reference, None, masks, labels)}
    with torch.no_grad():
        torch_row["latency_ms_b1"] = latency_ms(model, sample, args.repeats)
    rows = [torch_row]
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        onnx_path = export_model(model, "onnx", folder, input_size=(args.image_size, args.image_size))
        export_seconds = round(time.perf_counter() - start, 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        output_names = [o.name for o in session.get_outputs()]

        def run_onnx(x: torch.Tensor) -> dict[str, np.ndarray]:
            return dict(zip(output_names, session.run(None, {"input": x.numpy()}), strict=True))

        row = {"runtime": "onnxruntime", "weights": "fp32", "precision": "onnxruntime",
               **evaluate(batched(run_onnx, images, args.batch_size), reference, masks, labels),
               "latency_ms_b1": latency_ms(run_onnx, sample, args.repeats),
               "file_mb": round(onnx_path.stat().st_size / 1e6 + sum(
                   p.stat().st_size for p in onnx_path.parent.glob("*.data")) / 1e6, 2)}
        rows.append(check(row, torch_row))
        core = ov.Core()
        for variant in args.variants:
            start = time.perf_counter()
            xml = folder / f"{variant}.xml"
            try:
                openvino_variant(model, onnx_path, variant, xml)
            except Exception as error:  # record the failure, keep measuring the other variants
                rows.append({"runtime": "openvino", "weights": variant, "error": f"{type(error).__name__}: {error}"})
                print(f"{variant} failed: {error!r}", flush=True)
                continue
            convert_seconds = round(time.perf_counter() - start, 1)
            size_mb = round((xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 1e6, 2)
            for hint in HINTS:
                compiled = core.compile_model(core.read_model(xml), "CPU", openvino_config(hint, args.threads))
                request = compiled.create_infer_request()

                def run_ov(x: torch.Tensor, request=request, compiled=compiled) -> dict[str, np.ndarray]:
                    result = request.infer({0: x.numpy()})
                    return {port.any_name: np.array(result[port]) for port in compiled.outputs}

                row = {"runtime": "openvino", "weights": variant, "precision": hint,
                       "effective_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
                       **evaluate(batched(run_ov, images, args.batch_size), reference, masks, labels),
                       "latency_ms_b1": latency_ms(run_ov, sample, args.repeats), "file_mb": size_mb,
                       "convert_seconds": convert_seconds}
                rows.append(check(row, torch_row))
                print(json.dumps(row), flush=True)
    return {"model": name, "checkpoint": str(checkpoint), "hparams": {k: v for k, v in model.hparams.items()
                                                                      if isinstance(v, int | float | str | list)},
            "onnx_export_seconds": export_seconds, "test_images": len(images), "rows": rows}


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        f"# Export parity on MVTec AD {result['category']} (test set, {result['image_size']} px)",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['threads']} threads; torch "
        f"{result['machine']['torch']}, OpenVINO {result['machine']['openvino']}, nncf {result['machine']['nncf']}, "
        f"onnxruntime {result['machine']['onnxruntime']}. OpenVINO CPU default inference precision here: "
        f"**{result['machine']['openvino_default_precision']}**.",
        "Commands: " + "; ".join(f"`{command}`" for command in result["commands"]),
        "",
        "`f32` = `INFERENCE_PRECISION_HINT=f32`; `default` = the CPU plugin's default (bf16 on this CPU), shown for "
        "information. Tolerances: FP32 rows max |Δmap| ≤ 1e-3 of the torch map's range and identical labels; other "
        "rows |Δ image AUROC|, |Δ pixel AUROC| ≤ 0.005. Latency: batch 1, median; size: files on disk. "
        "INT8 = flow-head weights only (nncf.compress_weights, what `Engine.export` does for these models).",
        "",
        "| model | runtime | weights | precision | max \\|Δmap\\|/range | labels ≠ | image AUROC (Δ) | "
        "pixel AUROC (Δ) | pass | latency ms | size MB |",
        "|---|---|---|---|---:|---:|---:|---:|:-:|---:|---:|",
    ]
    for model in result["models"]:
        for row in model["rows"]:
            if "error" in row:
                lines.append(f"| {model['model']} | {row['runtime']} | {row['weights']} | – | export failed: "
                             f"{row['error'][:80]} | | | | ✗ | | |")
                continue
            delta = row.get("map_max_abs_rel")
            lines.append(
                f"| {model['model']} | {row['runtime']} | {row['weights']} | {row['precision']} | "
                f"{'–' if delta is None else f'{delta:.1e}'} | {row.get('label_differences', '–')} | "
                f"{row['image_AUROC']:.4f} ({row.get('image_AUROC_delta', 0):+.4f}) | "
                f"{row['pixel_AUROC']:.4f} ({row.get('pixel_AUROC_delta', 0):+.4f}) | "
                f"{'–' if 'passes' not in row else ('✓' if row['passes'] else '✗')} | {row['latency_ms_b1']} | "
                f"{row.get('file_mb', '–')} |"
            )
    lines += ["", "Checkpoints: " + "; ".join(f"{m['model']} `{m['checkpoint']}` ({m['epochs_note']})"
                                             for m in result["models"]), ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="Model=path/to/model.ckpt (CflowAD, FastFlow, CSFlow)")
    parser.add_argument("--epochs-note", nargs="*", default=[], help="Model=text recorded with each checkpoint")
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_parity"))
    parser.add_argument("--append", action="store_true", help="merge into an existing --out, replacing these models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import nncf
    import onnxruntime
    import openvino as ov

    notes = dict(item.split("=", 1) for item in args.epochs_note)
    models = []
    for item in args.ckpt:
        name, path = item.split("=", 1)
        if name not in {"CflowAD", "FastFlow", "CSFlow"}:
            msg = f"--ckpt model {name!r} is not one of ['CflowAD', 'FastFlow', 'CSFlow']."
            raise SystemExit(msg)
        result = run_model(name, Path(path), args)
        result["epochs_note"] = notes.get(name, "")
        models.append(result)
    command = "python benchmarks/export_parity.py " + " ".join(sys.argv[1:])
    for model in models:
        model["command"] = command
    previous = args.out.with_suffix(".json")
    if args.append and previous.exists():  # keep the other models of an earlier run (same machine and settings)
        kept = [m for m in json.loads(previous.read_text())["models"] if m["model"] not in {m["model"] for m in models}]
        order = {"CflowAD": 0, "FastFlow": 1, "CSFlow": 2}
        models = sorted(kept + models, key=lambda m: order[m["model"]])
    result = {
        "category": args.category,
        "image_size": args.image_size,
        "models": models,
        "machine": {**machine_info(args.threads), "torch": torch.__version__,
                    "openvino": ov.__version__.split("-")[0], "nncf": nncf.__version__,
                    "onnxruntime": onnxruntime.__version__,
                    "openvino_default_precision": str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))},
        "commands": sorted({m["command"] for m in models}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
