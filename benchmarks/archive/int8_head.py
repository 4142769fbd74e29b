r"""INT8 for the flow head, the part that runs in the CPU's fast precision: accuracy and speed against the default IR.

The backbone and the score tail must stay float32 (``backbone_precision.py``, ``default_precision.py``), so the one
place INT8 could go is the flow head. For each checkpoint this script takes the model's own IR (``to_openvino``:
backbone and score tail marked float32, head in the CPU's default precision), quantizes the head's activations and
weights with ``nncf.quantize`` calibrated on normal training images only (everything outside the head, and the
score tail, in nncf's ignored scope), marks the backbone and tail float32 again, and compares both IRs compiled with
no configuration (each in a fresh process) against torch FP32 on the test set. Latency: batch 1 and 8, interleaved.
A micro-benchmark of six stacked convolutions (1×1 and 3×3, float32 hint / default / INT8) shows what INT8 gains on
this CPU where nothing else is in the way.

    OMP_NUM_THREADS=2 python benchmarks/archive/int8_head.py --ckpt CflowAD=cflow.ckpt FastFlow=fastflow.ckpt \
        CSFlow=csflow.ckpt --out benchmarks/results/int8_head
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
from backbone_precision import normal_images, outputs
from export_parity import batched, evaluate, load_test_set
from harness.machine import cpu_model, isa_flags
from harness.timing import interleaved_wall_times, median_ms

import flowad_plugins
from flowad_plugins.export.onnx_graph import flow_head_names
from flowad_plugins.export.precision import float32_tail, head_entry_names, mark_precise, onnx_base_name

CONVOLUTION_CASES = ((1, 128, 32), (3, 128, 32), (1, 40, 32), (3, 64, 64))  # kernel, channels, map side


def quantize_head(xml: Path, head: set[str], calibration: list[np.ndarray], target: Path) -> int:
    """The IR at ``xml`` with its flow head in INT8 (nncf, normal-image calibration), written to ``target`` with the
    backbone, head entries and score tail marked float32; returns the number of FakeQuantize ops."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(xml)
    tail = {node.get_friendly_name() for node in float32_tail(model)}
    ignored = sorted(op.get_friendly_name() for op in model.get_ops()
                     if onnx_base_name(op.get_friendly_name()) not in head or op.get_friendly_name() in tail)
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration),
                              ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    ov.save_model(quantized, target, compress_to_fp16=False)
    keep = tail | head_entry_names(target, head)
    mark_precise(target, lambda name, kind: kind != "FakeQuantize"
                 and (name in keep or onnx_base_name(name) not in head))
    return sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())


def latencies(xmls: list[Path], image: torch.Tensor, repeats: int) -> list[dict[str, float]]:
    """Median ms per call of each IR at batch 1 and 8 (default precision, 2 threads), interleaved."""
    import openvino as ov

    core = ov.Core()
    result: list[dict[str, float]] = [{} for _ in xmls]
    for batch in (1, 8):
        images = image.expand(batch, -1, -1, -1).contiguous().numpy()
        calls = []
        for xml in xmls:
            model = core.read_model(xml)
            model.reshape({model.input(0).get_any_name(): list(images.shape)})
            request = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": "2"}).create_infer_request()
            calls.append(lambda request=request, images=images: request.infer({0: images}))
        for row, times in zip(result, interleaved_wall_times(calls, warmup=3, repeats=repeats), strict=True):
            row[f"ms_b{batch}"] = round(median_ms(times), 2)
    return result


def convolution_speeds(repeats: int) -> list[dict[str, float]]:
    """ms of six stacked convolutions + ReLU at batch 1: float32 hint, default precision and INT8 (nncf)."""
    import nncf
    import openvino as ov

    core, rows = ov.Core(), []
    for kernel, channels, side in CONVOLUTION_CASES:
        torch.manual_seed(0)
        layers = [torch.nn.Sequential(torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2),
                                      torch.nn.ReLU()) for _ in range(6)]
        shape = [1, channels, side, side]
        model = ov.convert_model(torch.nn.Sequential(*layers).eval(), example_input=torch.rand(*shape), input=shape)
        quantized = nncf.quantize(model, nncf.Dataset([np.random.rand(*shape).astype(np.float32) for _ in range(8)]),
                                  subset_size=8)
        x = np.random.rand(*shape).astype(np.float32)
        calls = []
        for graph, config in ((model, {"INFERENCE_PRECISION_HINT": "f32"}), (model, {}), (quantized, {})):
            request = core.compile_model(graph, "CPU", {**config, "INFERENCE_NUM_THREADS": "2"}).create_infer_request()
            calls.append(lambda request=request, x=x: request.infer({0: x}))
        f32, default, int8 = (median_ms(t) for t in interleaved_wall_times(calls, 5, repeats))
        rows.append({"kernel": kernel, "channels": channels, "side": side, "ms_f32": round(f32, 3),
                     "ms_default": round(default, 3), "ms_int8": round(int8, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_model(name: str, checkpoint: str, args: argparse.Namespace) -> dict:
    model = getattr(flowad_plugins, name).load_from_checkpoint(checkpoint, map_location="cpu",
                                                               weights_only=False).eval()
    size = int(model.pre_processor.transform.transforms[0].size[0])
    test, masks, labels = load_test_set(MVTecAD(root=args.root, category=args.category), size)
    calibration = [image[None].numpy() for image in normal_images(args.root, args.category, size, every=2)]
    with torch.no_grad():
        reference = batched(lambda x: {k: v.numpy() for k, v in model(x)._asdict().items() if v is not None}, test, 8)
    torch_metrics = evaluate(reference, None, masks, labels)
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shipped = Path(model.to_openvino(folder / "shipped", input_size=(size, size)))
        head = flow_head_names(model, model.to_onnx(folder / "onnx", input_size=(size, size)), (size, size))
        int8 = folder / "int8_head.xml"
        fake_quantize = quantize_head(shipped, head, calibration, int8)
        np.save(folder / "test.npy", test.numpy())
        rows, ran = [], []
        for label, xml in (("default IR", shipped), ("INT8 head", int8)):
            try:
                metrics = evaluate(outputs(xml, folder / "test.npy", folder), reference, masks, labels)
            except subprocess.CalledProcessError as error:  # the CPU plugin refused the graph: recorded, not fatal
                rows.append({"ir": label, "error": error.stderr.decode().strip().splitlines()[-1][:300]})
                continue
            rows.append({"ir": label, "image_AUROC_delta": round(metrics["image_AUROC"] - torch_metrics["image_AUROC"],
                                                                 4),
                         "pixel_AUROC_delta": round(metrics["pixel_AUROC"] - torch_metrics["pixel_AUROC"], 4),
                         "score_max_abs": round(metrics["score_max_abs"], 4)})
            ran.append(xml)
        timed = [row for row in rows if "error" not in row]
        for row, timing in zip(timed, latencies(ran, test[:1], args.repeats), strict=True):
            row.update(timing)
    print(name, json.dumps(rows), flush=True)
    return {"model": name, "checkpoint": Path(checkpoint).name, "image_size": size,
            "calibration_images": len(calibration), "fake_quantize_ops": fake_quantize, "rows": rows}


def markdown(result: dict) -> str:
    flags = ", ".join(flag for flag, present in result["machine"]["isa_flags"].items() if present)
    lines = ["# INT8 flow head vs the default-precision IR (MVTec AD bottle test set)", "",
             f"Machine: {result['machine']['cpu']} (ISA: {flags}), 2 threads, no configuration but the thread count "
             f"(the CPU's default precision). Command: `{result['command']}`", "",
             "| model | px | IR | Δ image AUROC | Δ pixel AUROC | max \\|Δscore\\| | ms b1 | ms b8 |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for model in result["models"]:
        for row in model["rows"]:
            if "error" in row:
                lines.append(f"| {model['model']} | {model['image_size']} | {row['ir']} | not run: `{row['error']}` "
                             "| | | | |")
                continue
            lines.append(f"| {model['model']} | {model['image_size']} | {row['ir']} | {row['image_AUROC_delta']:+.4f} "
                         f"| {row['pixel_AUROC_delta']:+.4f} | {row['score_max_abs']:.4f} | {row['ms_b1']} | "
                         f"{row['ms_b8']} |")
    lines += ["", "Six stacked convolutions + ReLU, batch 1, ms (what INT8 gains on this CPU by itself):", "",
              "| kernel | channels | map | f32 hint | default | INT8 | INT8 ÷ default speed-up |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kernel']}×{r['kernel']} | {r['channels']} | {r['side']}² | {r['ms_f32']} | {r['ms_default']} | "
              f"{r['ms_int8']} | {r['ms_default'] / r['ms_int8']:.2f}× |" for r in result["convolutions"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", required=True, help="Model=path/to/model.ckpt")
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_head"))
    args = parser.parse_args()
    command = "python benchmarks/archive/int8_head.py --ckpt " + " ".join(
        f"{spec.split('=', 1)[0]}={Path(spec.split('=', 1)[1]).name}" for spec in args.ckpt)
    result = {"command": command, "machine": {"cpu": cpu_model(), "isa_flags": isa_flags()},
              "convolutions": convolution_speeds(args.repeats), "models": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.ckpt:  # written after every model: a later failure keeps the rows already measured
        result["models"].append(run_model(*spec.split("=", 1), args))
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
