"""Torch CPU inference speed: our model vs anomalib's built-in, side by side in one process.

Same backbone, layers, input size and batch for both, called in turn pass by pass (a load burst on the shared
machine hits both alike); weights do not change the work done, so both
use the same random-initialised flows (ours loads the offline backbone weights, anomalib's gets
``pre_trained=False`` because it cannot download here). Each measurement: warm-up passes, then the
median wall time of ``--repeats`` passes. Results: ``benchmarks/results/<pair>_cpu_speed.{json,md}``.

    python benchmarks/inference_speed.py --pair cflow
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from harness.machine import machine_info
from harness.timing import interleaved_wall_times, median_ms
from rich.progress import track

from flowad_plugins.inference_passes import images_per_pass

RESULTS = Path(__file__).resolve().parent / "results"




def build_pair(pair: str, image_size: int = 256) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """Return (settings, ours, anomalib's) torch models in eval mode (``image_size``: for models built for one).

    The pairs (same backbone/layers where anomalib allows) are defined once, in ``harness.models``.
    """
    from harness.models import build_pair as build_lightning_pair

    if pair not in ("cflow", "csflow", "fastflow"):
        msg = f"Unknown pair={pair!r}; allowed: ['cflow', 'csflow', 'fastflow']."
        raise ValueError(msg)
    settings, ours, theirs = build_lightning_pair(pair, image_size)
    return settings, ours.model.eval(), theirs.model.eval()


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
    # ablation: ours with the whole batch in one pass (as anomalib runs it), sharing the same weights
    ours_one_pass = copy.copy(ours)
    ours_one_pass.inference_pass_pixels = 0
    per_pass = images_per_pass((args.image_size, args.image_size), ours.inference_pass_pixels)
    for batch_size in track(args.batch_sizes, description=f"timing {args.pair}"):
        images = torch.randn(batch_size, 3, args.image_size, args.image_size)
        with torch.inference_mode():
            calls = [lambda model=model, images=images: model(images) for model in (ours, ours_one_pass, theirs)]
            ours_times, one_pass_times, theirs_times = interleaved_wall_times(calls, args.warmup, args.repeats)
        ours_s, one_pass_s, theirs_s = (median_ms(t) / 1e3 for t in (ours_times, one_pass_times, theirs_times))
        rows.append({"batch_size": batch_size, "ours_ms": round(1e3 * ours_s, 1),
                     "anomalib_ms": round(1e3 * theirs_s, 1), "ours_img_per_s": round(batch_size / ours_s, 1),
                     "anomalib_img_per_s": round(batch_size / theirs_s, 1), "speedup": round(theirs_s / ours_s, 2),
                     "ours_one_pass_ms": round(1e3 * one_pass_s, 1),
                     "speedup_one_pass": round(theirs_s / one_pass_s, 2),
                     "ours_raw_s": ours_times, "ours_one_pass_raw_s": one_pass_times, "anomalib_raw_s": theirs_times,
                     "load_average_1min": round(os.getloadavg()[0], 2)})
    result = {
        "pair": args.pair,
        "settings": settings,
        "image_size": args.image_size,
        "command": f"python benchmarks/inference_speed.py --pair {args.pair} --repeats {args.repeats}",
        "machine": {**machine_info(torch.get_num_threads()), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
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
        f"Command: `{result['command']}` (median of {args.repeats} passes after {args.warmup} warm-up; the "
        "models are called in turn each round, the order reversed every round).",
        f"Ours runs an eval batch in passes of at most {per_pass} image(s) of this size "
        "(`flowad_plugins.inference_passes`); the *one pass* columns time the same model with passes off "
        "(`inference_pass_pixels=0`), as anomalib runs a batch.",
        "",
        "| batch | ours ms | anomalib ms | ours img/s | anomalib img/s | speed-up (ours/anomalib) | ours one pass ms "
        "| speed-up, one pass |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['batch_size']} | {r['ours_ms']} | {r['anomalib_ms']} | {r['ours_img_per_s']} | "
              f"{r['anomalib_img_per_s']} | **{r['speedup']}×** | {r['ours_one_pass_ms']} | "
              f"{r['speedup_one_pass']}× |" for r in rows]
    lines += ["", f"Saved state-dict files (torch.save): ours {sizes['ours_mb']} MB, "
              f"anomalib {sizes['anomalib_mb']} MB "
              f"(ours = {sizes['ours_over_anomalib']} × anomalib's); parameters: ours {sizes['ours_parameters']:,}, "
              f"anomalib {sizes['anomalib_parameters']:,}."]
    (RESULTS / f"{args.pair}_cpu_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
