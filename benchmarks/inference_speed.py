"""Torch CPU inference speed: our model vs anomalib's built-in, side by side in one process.

Same backbone, layers, input size and batch for both; weights do not change the work done, so both
use the same random-initialised flows (ours loads the offline backbone weights, anomalib's gets
``pre_trained=False`` because it cannot download here). Each measurement: warm-up passes, then the
median wall time of ``--repeats`` passes. Results: ``benchmarks/results/<pair>_cpu_speed.{json,md}``.

    python benchmarks/inference_speed.py --pair cflow
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.progress import track

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_pair(pair: str, image_size: int = 256) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """Return (settings, ours, anomalib's) torch models in eval mode (``image_size``: for models built for one)."""
    if pair == "cflow":
        from anomalib.models.image.cflow.torch_model import CflowModel

        from flowad_plugins.models.cflow_ad import CflowADModel

        settings = {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "coupling_blocks": 8,
                    "condition_dim": 128, "clamp_alpha": 1.9}
        ours = CflowADModel(backbone=settings["backbone"], layers=settings["layers"], pre_trained=True,
                            coupling_blocks=8, condition_dim=128, clamp_alpha=1.9, permute_soft=True)
        theirs = CflowModel(backbone=settings["backbone"], layers=settings["layers"], pre_trained=False,
                            coupling_blocks=8, condition_vector=128, clamp_alpha=1.9, permute_soft=False)
        return settings, ours.eval(), theirs.eval()
    if pair == "csflow":
        from unittest import mock

        import torchvision
        from anomalib.models.image.csflow import torch_model as anomalib_csflow

        from flowad_plugins.models.cs_flow import CSFlowModel

        # anomalib's Csflow at its own defaults (EfficientNet-B5 features.6.8, 304 channels, subnet width 1024,
        # 4 blocks, clamp 3); it always downloads B5 weights, so build it with random ones (same work).
        settings = {"ours": "CSFlowModel() defaults: efficientnet_lite0 blocks.4 (112 ch), width 112, k [3,3,3,5]",
                    "anomalib": "CsFlowModel(input_size, cross_conv_hidden_channels=1024), EfficientNet-B5"}

        def random_b5(*_, **kwargs):
            kwargs.pop("weights", None)
            return torchvision.models.efficientnet_b5(weights=None, **kwargs)

        ours = CSFlowModel()
        with mock.patch.object(anomalib_csflow, "efficientnet_b5", random_b5):
            theirs = anomalib_csflow.CsFlowModel(input_size=(image_size, image_size), cross_conv_hidden_channels=1024)
        return settings, ours.eval(), theirs.eval()
    if pair == "fastflow":
        from anomalib.models.image.fastflow.torch_model import FastflowModel

        from flowad_plugins.models.fastflow import FastFlowModel

        # the paper's ResNet18 setting for both: layer1..layer3, 8 steps of 3×3 subnets, hidden ratio 1.0
        settings = {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"], "flow_steps": 8,
                    "conv3x3_only": True, "hidden_ratio": 1.0}
        ours = FastFlowModel(input_size=(image_size, image_size), backbone="resnet18", pre_trained=False,
                             flow_steps=8, conv3x3_only=True, hidden_ratio=1.0)
        theirs = FastflowModel(input_size=(image_size, image_size), backbone="resnet18", pre_trained=False,
                               flow_steps=8, conv3x3_only=True, hidden_ratio=1.0)
        return settings, ours.eval(), theirs.eval()
    msg = f"Unknown pair={pair!r}; allowed: ['cflow', 'csflow', 'fastflow']."
    raise ValueError(msg)


def state_dict_sizes(ours: torch.nn.Module, theirs: torch.nn.Module) -> dict:
    """Sizes of both models' state dicts saved with ``torch.save`` (MB) and their parameter counts."""
    import tempfile

    sizes = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in (("ours", ours), ("anomalib", theirs)):
            path = Path(folder) / f"{name}.pt"
            torch.save(model.state_dict(), path)
            sizes[f"{name}_mb"] = round(path.stat().st_size / 2**20, 1)
            sizes[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
            path.unlink()
    sizes["ours_over_anomalib"] = round(sizes["ours_mb"] / sizes["anomalib_mb"], 4)
    return sizes


def time_model(model: torch.nn.Module, images: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            model(images)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="cflow", choices=["cflow", "csflow", "fastflow"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    settings, ours, theirs = build_pair(args.pair, args.image_size)
    sizes = state_dict_sizes(ours, theirs)
    rows = []
    for batch_size in track(args.batch_sizes, description=f"timing {args.pair}"):
        images = torch.randn(batch_size, 3, args.image_size, args.image_size)
        ours_times = time_model(ours, images, args.warmup, args.repeats)
        theirs_times = time_model(theirs, images, args.warmup, args.repeats)
        ours_s, theirs_s = statistics.median(ours_times), statistics.median(theirs_times)
        rows.append({"batch_size": batch_size, "ours_ms": round(1e3 * ours_s, 1),
                     "anomalib_ms": round(1e3 * theirs_s, 1), "ours_img_per_s": round(batch_size / ours_s, 1),
                     "anomalib_img_per_s": round(batch_size / theirs_s, 1), "speedup": round(theirs_s / ours_s, 2),
                     "ours_raw_s": ours_times, "anomalib_raw_s": theirs_times})
    result = {
        "pair": args.pair,
        "settings": settings,
        "image_size": args.image_size,
        "command": f"python benchmarks/inference_speed.py --pair {args.pair}",
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "rows": rows,
        "state_dict_files": sizes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.pair}_cpu_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# {args.pair}: torch CPU inference, ours vs anomalib ({args.image_size} px)",
        "",
        f"Settings: `{json.dumps(settings)}`. Machine: {result['machine']['cpu']}, "
        f"{result['machine']['torch_threads']} torch threads, torch {torch.__version__}.",
        f"Command: `{result['command']}` (median of {args.repeats} passes after {args.warmup} warm-up).",
        "",
        "| batch | ours ms | anomalib ms | ours img/s | anomalib img/s | speed-up (ours/anomalib) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['batch_size']} | {r['ours_ms']} | {r['anomalib_ms']} | {r['ours_img_per_s']} | "
              f"{r['anomalib_img_per_s']} | **{r['speedup']}×** |" for r in rows]
    lines += ["", f"Saved state-dict files (torch.save): ours {sizes['ours_mb']} MB, "
              f"anomalib {sizes['anomalib_mb']} MB "
              f"(ours = {sizes['ours_over_anomalib']} × anomalib's); parameters: ours {sizes['ours_parameters']:,}, "
              f"anomalib {sizes['anomalib_parameters']:,}."]
    (RESULTS / f"{args.pair}_cpu_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
