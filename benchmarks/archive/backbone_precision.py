r"""How much of the backbone must stay float32 when the exported IR runs at the CPU's default precision (bf16).

``to_openvino`` keeps the whole backbone float32 (``flowad_plugins.export.precision``). This script tests whether a
part would do: for each variant, the IR's backbone is float32 up to its ``k``-th convolution (in graph order, the
input normalisation included) and bf16 after it, the flow head is bf16 and the score tail float32 as shipped. Each
variant is compiled with no configuration in a fresh process (``default_precision.py --worker``) and compared with
torch FP32: the largest and median |Δscore| on normal training images (no labels needed), Δ image / pixel AUROC on
the test set, and the batch-1 latency (interleaved, one process).

    OMP_NUM_THREADS=2 python benchmarks/archive/backbone_precision.py --ckpt cflow_ad_bottle.ckpt --model CflowAD \
        --prefixes 0 1 3 6 9 15 all --out benchmarks/results/backbone_precision
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from anomalib.data import MVTecAD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness and the scripts
from default_precision import unmarked_copy
from export_parity import batched, evaluate, load_test_set
from harness.machine import cpu_model, isa_flags
from harness.timing import interleaved_wall_times, median_ms
from torchvision.transforms.v2 import functional as TF

import flowad_plugins
from flowad_plugins.export.onnx_graph import flow_head_names
from flowad_plugins.export.precision import float32_tail, head_entry_names, mark_precise, onnx_base_name

CONVOLUTIONS = ("Convolution", "GroupConvolution")


def backbone_conv_index(xml: Path, head: set[str]) -> dict[str, int]:
    """Each backbone layer's name → the index of the backbone convolution it is or follows (graph order; the input
    normalisation before the first convolution: 0)."""
    import openvino as ov

    index, count = {}, 0
    for op in ov.Core().read_model(xml).get_ordered_ops():
        name = op.get_friendly_name()
        if onnx_base_name(name) in head:
            continue
        count += op.get_type_name() in CONVOLUTIONS
        index[name] = max(count - 1, 0)
    return index


def normal_images(root: str, category: str, size: int, every: int) -> torch.Tensor:
    """Every ``every``-th normal training image, resized as the pre-processor does: ``N×3×S×S``."""
    datamodule = MVTecAD(root=root, category=category)
    datamodule.setup("fit")
    items = [datamodule.train_data[i] for i in range(0, len(datamodule.train_data), every)]
    return torch.stack([TF.resize(item.image, [size, size], antialias=True) for item in items])


def outputs(xml: Path, images_npy: Path, folder: Path) -> dict[str, np.ndarray]:
    """The IR's outputs on ``images_npy``, compiled with no configuration in a fresh process."""
    out = folder / f"{xml.stem}_{images_npy.stem}.npz"
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "default_precision.py"), "--worker", str(xml),
                    "default", str(images_npy), str(out)], check=True, capture_output=True)
    stored = dict(np.load(out))
    stored.pop("effective_precision")
    return stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--model", default="CflowAD", choices=["CflowAD", "FastFlow", "CSFlow"])
    parser.add_argument("--prefixes", nargs="+", default=["0", "1", "3", "6", "9", "15", "all"],
                        help="float32 backbone convolutions from the input, with the input normalisation and the "
                             "ops after each (0 = none, all = the shipped IR)")
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/backbone_precision"))
    args = parser.parse_args()
    model = getattr(flowad_plugins, args.model).load_from_checkpoint(args.ckpt, map_location="cpu",
                                                                     weights_only=False).eval()
    size = int(model.pre_processor.transform.transforms[0].size[0])
    test, masks, labels = load_test_set(MVTecAD(root=args.root, category=args.category), size)
    normal = normal_images(args.root, args.category, size, every=5)

    def torch_outputs(images: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return batched(lambda x: {k: v.numpy() for k, v in model(x)._asdict().items() if v is not None}, images, 8)

    reference_test, reference_normal = torch_outputs(test), torch_outputs(normal)
    reference = evaluate(reference_test, None, masks, labels)
    rows, calls, first_image = [], [], test[:1].numpy()
    import openvino as ov

    core = ov.Core()
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shipped = Path(model.to_openvino(folder / "shipped", input_size=(size, size)))
        head = flow_head_names(model, model.to_onnx(folder / "onnx", input_size=(size, size)), (size, size))
        conv_index = backbone_conv_index(shipped, head)
        keep = {node.get_friendly_name() for node in float32_tail(core.read_model(shipped))}
        keep |= head_entry_names(shipped, head)
        np.save(folder / "test.npy", test.numpy())
        np.save(folder / "normal.npy", normal.numpy())
        for prefix in args.prefixes:
            limit = max(conv_index.values()) + 1 if prefix == "all" else int(prefix)
            xml = folder / f"float32_prefix_{prefix}.xml"
            unmarked_copy(shipped, xml)
            mark_precise(xml, lambda name, _, limit=limit: name in keep or (
                onnx_base_name(name) not in head and conv_index.get(name, limit) < limit))
            on_normal = outputs(xml, folder / "normal.npy", folder)
            delta = np.abs(on_normal["pred_score"].reshape(-1) - reference_normal["pred_score"].reshape(-1))
            on_test = evaluate(outputs(xml, folder / "test.npy", folder), reference_test, masks, labels)
            rows.append({"float32_convolutions": prefix, "normal_dscore_max": round(float(delta.max()), 4),
                         "normal_dscore_median": round(float(np.median(delta)), 4),
                         "image_AUROC_delta": round(on_test["image_AUROC"] - reference["image_AUROC"], 4),
                         "pixel_AUROC_delta": round(on_test["pixel_AUROC"] - reference["pixel_AUROC"], 4)})
            print(json.dumps(rows[-1]), flush=True)
            request = core.compile_model(xml, "CPU", {"INFERENCE_NUM_THREADS": "2"}).create_infer_request()
            calls.append(lambda request=request: request.infer({0: first_image}))
        for row, times in zip(rows, interleaved_wall_times(calls, warmup=3, repeats=30), strict=True):
            row["latency_ms_b1"] = round(median_ms(times), 2)
    result = {"model": args.model, "checkpoint": Path(args.ckpt).name, "category": args.category,
              "backbone_convolutions": max(conv_index.values()) + 1, "machine": {"cpu": cpu_model(),
                                                                                 "isa_flags": isa_flags()},
              "command": f"python benchmarks/archive/backbone_precision.py --ckpt {Path(args.ckpt).name} --model "
                         f"{args.model} --prefixes {' '.join(args.prefixes)}", "rows": rows}
    flags = ", ".join(flag for flag, present in result["machine"]["isa_flags"].items() if present)
    lines = [f"# {args.model}: how much of the backbone must stay float32 at the CPU's default precision", "",
             f"Machine: {result['machine']['cpu']} (ISA: {flags}), 2 threads. Command: `{result['command']}`. "
             f"The backbone has {result['backbone_convolutions']} convolutions; the head runs bf16 and the score "
             "tail float32 in every variant. Δ against torch FP32; |Δscore| on every 5th normal training image, "
             f"AUROC on the {args.category} test set.", "",
             "| float32 backbone convolutions | max / median \\|Δscore\\|, normal train | Δ image AUROC | "
             "Δ pixel AUROC | ms b1 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['float32_convolutions']} | {r['normal_dscore_max']:.4f} / {r['normal_dscore_median']:.4f} | "
              f"{r['image_AUROC_delta']:+.4f} | {r['pixel_AUROC_delta']:+.4f} | {r['latency_ms_b1']:.2f} |"
              for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
