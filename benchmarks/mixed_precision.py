"""float32 vs bf16-mixed on an MVTec category: train time, inference time and test-metric deltas per model.

Each (model, precision) pair is one ``benchmarks/evaluate.py`` run in a fresh process (same seed, epochs, data,
no-leakage protocol), one after another; run it on an otherwise idle machine so timings do not contend with
other heavy jobs. Under ``bf16-mixed`` only the frozen backbone runs in bf16; flows, log-dets,
likelihoods and scores stay float32 (``flowad_plugins.precision``).

    python benchmarks/mixed_precision.py --models CflowAD FastFlow CSFlow

Writes ``benchmarks/results/bf16_<model>_<precision>.json`` (evaluate.py's output) and the comparison
``benchmarks/results/bf16_summary.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The repository's offline settings (configs/*_efficientnet_lite0.yaml), shortened schedules.
RECIPES: dict[str, dict] = {
    "CflowAD": {"epochs": 2, "batch_size": 16,
                "init": ["backbone=efficientnet_lite0", "layers=[blocks.2,blocks.4]", "fiber_batch_size=256"]},
    "FastFlow": {"epochs": 10, "batch_size": 16,
                 "init": ["backbone=efficientnet_lite0", "layers=[blocks.1,blocks.2,blocks.4]"]},
    "CSFlow": {"epochs": 4, "batch_size": 8, "init": ["backbone=efficientnet_lite0", "lr=0.001"]},
}
PRECISIONS = ("32", "bf16-mixed")
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


def run_one(model: str, precision: str, root: str) -> dict:
    """One evaluate.py run; returns its JSON (also saved under ``benchmarks/results``)."""
    recipe = RECIPES[model]
    out = RESULTS / f"bf16_{model.lower()}_{precision.replace('-mixed', '')}.json"
    command = [sys.executable, str(REPO / "benchmarks" / "evaluate.py"), "--model", model, "--root", root,
               "--epochs", str(recipe["epochs"]), "--batch-size", str(recipe["batch_size"]),
               "--precision", precision, "--init", *recipe["init"], "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        msg = f"{model} at precision {precision} failed:\n{result.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(out.read_text())


def summarise(runs: dict[str, dict[str, dict]]) -> tuple[dict, str]:
    """Per model: train s, inference ms (batch 8) and test metrics at each precision, and bf16 − fp32 deltas."""
    summary, lines = {}, [
        "| model | epochs | fp32 train s | bf16 train s | train speed-up | fp32 infer ms | bf16 infer ms | "
        + " | ".join(f"Δ {m} (bf16 − fp32)" for m in METRICS) + " | NaN-free |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(METRICS) + "---|",
    ]
    for model, by_precision in runs.items():
        fp32, bf16 = by_precision["32"], by_precision["bf16-mixed"]
        deltas = {m: round(bf16["test_metrics"][m] - fp32["test_metrics"][m], 4) for m in METRICS}
        finite = all(v == v for run in (fp32, bf16) for v in run["test_metrics"].values())
        entry = {
            "epochs": fp32["epochs"],
            "train_seconds": {"32": fp32["train_seconds"], "bf16-mixed": bf16["train_seconds"]},
            "train_speedup": round(fp32["train_seconds"] / bf16["train_seconds"], 2),
            "inference_ms_batch8": {"32": fp32["torch_cpu_inference"]["median_ms"],
                                    "bf16-mixed": bf16["torch_cpu_inference"]["median_ms"]},
            "test_metrics": {"32": fp32["test_metrics"], "bf16-mixed": bf16["test_metrics"]},
            "delta_bf16_minus_fp32": deltas,
            "all_metrics_finite": finite,
            "commands": [fp32["command"], bf16["command"]],
        }
        summary[model] = entry
        lines.append(
            f"| {model} | {entry['epochs']} | {fp32['train_seconds']} | {bf16['train_seconds']} | "
            f"{entry['train_speedup']}× | {entry['inference_ms_batch8']['32']} | "
            f"{entry['inference_ms_batch8']['bf16-mixed']} | " + " | ".join(f"{deltas[m]:+.4f}" for m in METRICS)
            + f" | {'yes' if finite else 'NO'} |"
        )
    return summary, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--root", default="../shared/data/mvtec_ad")
    args = parser.parse_args()

    runs: dict[str, dict[str, dict]] = {}
    pairs = [(model, precision) for model in args.models for precision in PRECISIONS]
    command = "python benchmarks/mixed_precision.py " + " ".join(sys.argv[1:])
    for model, precision in tqdm(pairs, desc="evaluate.py runs", unit="run"):
        start = time.perf_counter()
        runs.setdefault(model, {})[precision] = run_one(model, precision, args.root)
        tqdm.write(f"{model} {precision}: done in {time.perf_counter() - start:.0f} s")
        if len(runs[model]) == len(PRECISIONS):
            write_summary({m: r for m, r in runs.items() if len(r) == len(PRECISIONS)}, command)


def write_summary(runs: dict[str, dict[str, dict]], command: str) -> None:
    """``bf16_summary.{json,md}`` for the models whose both runs are done (rewritten after each model)."""
    import torch
    from harness.machine import machine_info

    summary, table = summarise(runs)
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    machine = {**machine_info(threads), "torch": torch.__version__,
               "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text()}
    (RESULTS / "bf16_summary.json").write_text(json.dumps({"machine": machine, "command": command,
                                                           "models": summary}, indent=1) + "\n")
    markdown = (
        f"# float32 vs bf16-mixed, MVTec AD bottle (256 px), CPU\n\nMachine: {machine['cpu']}, "
        f"{machine['threads']} threads, torch {machine['torch']}, avx512_bf16: {machine['cpu_bf16']}. "
        f"\n\nCommand: `{command}`\n\n{table}\n\n"
        "Train s includes the per-epoch validation pass; inference = torch eager, batch 8, median of 5 "
        "(under CPU bf16 autocast for bf16). Under bf16-mixed only the frozen backbone runs in bf16; flows, "
        "log-dets, likelihoods and maps stay float32.\n"
    )
    (RESULTS / "bf16_summary.md").write_text(markdown)
    tqdm.write(markdown)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: harness, evaluate
    main()
