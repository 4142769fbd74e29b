"""Each model's exported IR compiled with no configuration at all, against torch FP32: accuracy and latency.

For each checkpoint the model is exported with its own ``to_openvino`` (fixed input size; ours with the backbone and
score tail marked float32 as ``flowad_plugins.export.precision`` does) and, for ours, three copies that move the
float32 boundary: only the backbone in the fast precision (``backbone``), only the tail float32 (``tail``), no marks
(``unmarked``). anomalib's models (``anomalib.Cflow``/``anomalib.Fastflow``, trained by ``decisions.py``) run as
anomalib exports them. Each IR is compiled in a **fresh process** per precision (one compiled model per process: the
measurement cannot depend on what else was compiled before it), with no configuration (``core.compile_model(xml,
"CPU")``, the CPU plugin's default: bf16 on CPUs with AVX512-BF16/AMX) and with ``INFERENCE_PRECISION_HINT=f32``,
and runs the whole test set (images resized as the pre-processor does). Rows: image and pixel AUROC and their
difference from torch FP32, false alarms at the shipped threshold, max |Δscore|, labels that differ from torch.
Latency: batch 1 and batch 8, median over interleaved rounds (all variants compiled in one process, the order
reversed every round).

    python benchmarks/default_precision.py --ckpt CflowAD=cflow.ckpt FastFlow=fastflow.ckpt CSFlow=csflow.ckpt \
        anomalib.Cflow=anomalib.Cflow_bottle.pt anomalib.Fastflow=anomalib.Fastflow_bottle.pt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from anomalib.data import MVTecAD
from export_parity import batched, evaluate, load_test_set
from harness.machine import machine_info
from harness.models import build_model, default_input_side, load_checkpoint
from harness.timing import interleaved_wall_times, median_ms

TOLERANCE = 0.005  # |Δ image AUROC| and |Δ pixel AUROC| against torch FP32
FALSE_ALARM_TOLERANCE = 0.02  # |Δ false-alarm rate| at the shipped threshold against torch FP32


def judge(row: dict, torch_row: dict) -> None:
    """Set ``row["passes"]``: within ``TOLERANCE`` of torch's AUROCs and ``FALSE_ALARM_TOLERANCE`` of its rate."""
    rate_change = (row["false_alarms"] - torch_row["false_alarms"]) / torch_row["normal_images"]
    row["false_alarm_rate_delta"] = round(rate_change, 4)
    row["passes"] = bool(abs(row["image_AUROC_delta"]) <= TOLERANCE and abs(row["pixel_AUROC_delta"]) <= TOLERANCE
                         and abs(rate_change) <= FALSE_ALARM_TOLERANCE)
VARIANTS = (("marked", "default"), ("marked", "f32"), ("backbone", "default"), ("tail", "default"),
            ("unmarked", "default"))
ANOMALIB_VARIANTS = (("anomalib", "default"), ("anomalib", "f32"))  # anomalib's IR as it writes it
PRECISION_NAMES = {"<Type: 'bfloat16'>": "bf16", "<Type: 'float32'>": "f32", "<Type: 'float16'>": "f16"}


def unmarked_copy(xml: Path, target: Path) -> None:
    """``xml`` without its ``precise`` attributes, next to the same weights."""
    tree = ElementTree.parse(xml)
    for rt_info in tree.getroot().iter("rt_info"):
        for attribute in [a for a in rt_info if a.get("name") == "precise"]:
            rt_info.remove(attribute)
    tree.write(target, encoding="utf-8", xml_declaration=True)
    target.with_suffix(".bin").write_bytes(xml.with_suffix(".bin").read_bytes())


def tail_only_copy(xml: Path, target: Path) -> None:
    """``xml`` with only its score tail marked float32 (backbone and flow head in the CPU's fast precision)."""
    import openvino as ov

    from flowad_plugins.export.precision import float32_tail, mark_precise

    unmarked_copy(xml, target)
    tail = {node.get_friendly_name() for node in float32_tail(ov.Core().read_model(target))}
    mark_precise(target, lambda name, _: name in tail)


def backbone_fast_copy(xml: Path, target: Path) -> None:
    """``xml`` with its backbone in the CPU's fast precision: every layer the shipped marks leave out (the flow head)
    and the score tail marked float32 instead."""
    import openvino as ov

    from flowad_plugins.export.precision import float32_tail, mark_precise, marked_layer_names

    shipped = marked_layer_names(xml)
    unmarked_copy(xml, target)
    tail = {node.get_friendly_name() for node in float32_tail(ov.Core().read_model(target))}
    mark_precise(target, lambda name, _: name in tail or name not in shipped)


def compile_config(hint: str) -> dict[str, str]:
    return {} if hint == "default" else {"INFERENCE_PRECISION_HINT": hint}


def worker(xml: str, hint: str, images_path: str, out: str) -> None:
    """One compiled model in this process: outputs of every image of ``images_path`` (``.npy``) to ``out``."""
    import openvino as ov

    compiled = ov.Core().compile_model(xml, "CPU", compile_config(hint))
    request = compiled.create_infer_request()
    images = torch.from_numpy(np.load(images_path))

    def run(x: torch.Tensor) -> dict[str, np.ndarray]:
        result = request.infer({0: x.numpy()})
        return {port.any_name: np.array(result[port], copy=True) for port in compiled.outputs}

    outputs = batched(run, images, 8)
    np.savez(out, **outputs, effective_precision=str(compiled.get_property("INFERENCE_PRECISION_HINT")))


def latencies_ms(xmls: dict[str, Path], images: torch.Tensor, threads: int, repeats: int,
                 variants: tuple[tuple[str, str], ...]) -> dict[str, dict]:
    """Median ms per call of every ``(variant, hint)`` at batch 1 and 8, interleaved."""
    import openvino as ov

    core = ov.Core()
    result: dict[str, dict] = {}
    for batch in (1, 8):
        x = images[:batch].numpy()
        calls, names = [], []
        for variant, hint in variants:
            config = {**compile_config(hint), "INFERENCE_NUM_THREADS": str(threads)}
            request = core.compile_model(xmls[variant], "CPU", config).create_infer_request()
            calls.append(lambda request=request, x=x: request.infer({0: x}))
            names.append(f"{variant}/{hint}")
        for name, times in zip(names, interleaved_wall_times(calls, repeats=repeats, warmup=3), strict=True):
            result.setdefault(name, {})[f"latency_ms_b{batch}"] = round(median_ms(times), 2)
    return result


def load_anomalib(name: str, path: Path):
    """anomalib's model from a ``decisions.py --save-checkpoints`` state file (its build and its trained state)."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved["name"] != name:
        msg = f"--ckpt {name}={path}: the file holds {saved['name']}."
        raise ValueError(msg)
    model = build_model(name, saved["init"], default_input_side(name), real_weights=True,
                        keep_anomalib_post_processor=True)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def run_model(name: str, checkpoint: Path, args: argparse.Namespace) -> dict:
    anomalib = name.startswith("anomalib.")
    model = load_anomalib(name, checkpoint) if anomalib else load_checkpoint(name, checkpoint, weights_only=False)
    model = model.eval()
    variants = ANOMALIB_VARIANTS if anomalib else VARIANTS
    size = int(model.pre_processor.transform.transforms[0].size[0]) if args.image_size is None else args.image_size
    images, masks, labels = load_test_set(MVTecAD(root=args.root, category=args.category), size)
    with torch.no_grad():
        reference = batched(lambda x: {k: v.numpy() for k, v in model(x)._asdict().items() if v is not None},
                            images, 8)
    rows = [{"variant": "torch", "precision": "fp32", **evaluate(reference, None, masks, labels)}]
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        exported = Path(model.to_openvino(folder / "exported", input_size=(size, size)))
        if anomalib:
            xmls = {"anomalib": exported}
        else:
            xmls = {"marked": exported, "unmarked": folder / "unmarked.xml", "tail": folder / "tail.xml",
                    "backbone": folder / "backbone.xml"}
            unmarked_copy(exported, xmls["unmarked"])
            tail_only_copy(exported, xmls["tail"])
            backbone_fast_copy(exported, xmls["backbone"])
        np.save(folder / "images.npy", images.numpy())
        for variant, hint in variants:
            out = folder / f"{variant}_{hint}.npz"
            subprocess.run([sys.executable, __file__, "--worker", str(xmls[variant]), hint,
                            str(folder / "images.npy"), str(out)], check=True)
            stored = dict(np.load(out))
            precision = str(stored.pop("effective_precision"))
            row = {"variant": variant, "precision": hint, "effective_precision": precision,
                   **evaluate(stored, reference, masks, labels)}
            row["image_AUROC_delta"] = round(row["image_AUROC"] - rows[0]["image_AUROC"], 5)
            row["pixel_AUROC_delta"] = round(row["pixel_AUROC"] - rows[0]["pixel_AUROC"], 5)
            judge(row, rows[0])
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        timings = latencies_ms(xmls, images, args.threads, args.repeats, variants)
    for row in rows[1:]:
        row.update(timings[f"{row['variant']}/{row['precision']}"])
    return {"model": name, "checkpoint": Path(checkpoint).name, "image_size": size, "rows": rows}


def _false_alarms(row: dict) -> str:
    return f"{row['false_alarms']}/{row['normal_images']}" if "false_alarms" in row else "–"


def markdown(result: dict) -> str:
    machine = result["machine"]
    flags = ", ".join(flag for flag, present in machine["isa_flags"].items() if present) or "none"
    lines = [
        f"# Exported IR at the CPU's default precision vs torch FP32 (MVTec AD {result['category']}, test set)",
        "",
        f"Machine: {machine['cpu']} (ISA: {flags}), {machine['threads']} threads, OpenVINO {machine['openvino']}.",
        f"Command: `{result['command']}`",
        "",
        "`marked` = our IR as `to_openvino` writes it (backbone and score tail float32, flow head in the CPU's fast "
        "precision); `backbone` = only the backbone in the fast precision (head and score tail float32); `tail` = "
        "only the score tail float32 (backbone and head in the fast precision); `unmarked` = no marks; `anomalib` = "
        "anomalib's IR as anomalib writes it (no marks). `default` = compiled with no configuration; `f32` = "
        f"`INFERENCE_PRECISION_HINT=f32`. Pass: |Δ image AUROC| and |Δ pixel AUROC| ≤ {TOLERANCE} and the false-alarm "
        f"rate within {100 * FALSE_ALARM_TOLERANCE:.0f} points of torch. "
        "False alarms: normal test images labelled anomalous at the threshold the model ships.",
        "",
        "| model | px | IR | compiled | image AUROC (Δ) | pixel AUROC (Δ) | false alarms | max \\|Δscore\\| | "
        "labels ≠ | pass | ms b1 | ms b8 |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|:-:|---:|---:|",
    ]
    for model in result["models"]:
        for row in model["rows"]:
            if row["variant"] == "torch":
                lines.append(f"| {model['model']} | {model['image_size']} | torch | fp32 | {row['image_AUROC']:.4f} "
                             f"| {row['pixel_AUROC']:.4f} | {_false_alarms(row)} | – | – | – | – | – |")
                continue
            effective = PRECISION_NAMES.get(row["effective_precision"], row["effective_precision"])
            lines.append(
                f"| {model['model']} | {model['image_size']} | {row['variant']} | {row['precision']} ({effective}) | "
                f"{row['image_AUROC']:.4f} ({row['image_AUROC_delta']:+.4f}) | "
                f"{row['pixel_AUROC']:.4f} ({row['pixel_AUROC_delta']:+.4f}) | {_false_alarms(row)} | "
                f"{row['score_max_abs']:.4f} | "
                f"{row['label_differences']} | {'✓' if row['passes'] else '✗'} | {row['latency_ms_b1']} | "
                f"{row['latency_ms_b8']} |")
    lines += ["", "Checkpoints: " + "; ".join(f"{m['model']} `{Path(m['checkpoint']).name}`"
                                             for m in result["models"]) + ". " + result.get("note", ""), ""]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", nargs="+", default=[],
                        help="Model=path: CflowAD, FastFlow, CSFlow (.ckpt); anomalib.Cflow, anomalib.Fastflow (.pt "
                             "of decisions.py --save-checkpoints)")
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's own input size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/default_precision"))
    parser.add_argument("--note", default="", help="how the checkpoints were made (written under the table)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the existing --out .json")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["note"] = args.note or result.get("note", "")
        for model in result["models"]:
            for row in model["rows"][1:]:
                judge(row, model["rows"][0])
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(markdown(result))
        return
    if not args.ckpt:
        parser.error("--ckpt Model=path ... is required (unless --report-only)")
    import openvino

    command = "python benchmarks/default_precision.py " + " ".join(
        f"--ckpt {' '.join(f'{k}={Path(v).name}' for k, v in (c.split('=', 1) for c in args.ckpt))}".split())
    if args.category != "bottle":
        command += f" --root {args.root} --category {args.category}"
    result = {"category": args.category, "command": command, "note": args.note,
              "machine": {**machine_info(args.threads), "openvino": openvino.__version__},
              "models": [run_model(*spec.split("=", 1), args) for spec in args.ckpt]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
