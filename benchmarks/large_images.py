"""Peak memory (RSS) and time of each model on large camera frames: 1024×1024 and 1280×960, CPU.

Every (model, size, pass) runs in a fresh Python process, so one measurement cannot inherit another's
allocator state. A process builds the model (the repository's offline efficientnet_lite0 settings,
``configs/*_efficientnet_lite0.yaml``), runs one warm-up pass and one timed pass, and reports the resident
memory after the imports, after building the model, and the process's peak (``VmHWM``, everything included):
``pass_peak_mib`` = peak − resident size with the model built = what the pass itself needed at most.

- ``inference``: ``model(images)`` in eval mode, batch ``--batch-size`` (CflowAD decodes the fibers in chunks of
  ``inference_chunk_size``; ``--cflow-chunks`` measures several chunk sizes).
- ``train_step``: one optimisation step as ``training_step`` does it: forward, loss, backward, Adam step
  (CflowAD: one fiber batch of ``fiber_batch_size`` fibers per layer, which is what bounds its training memory
  whatever the image size).

    python benchmarks/large_images.py

Writes ``benchmarks/results/large_images_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SIZES = {"1024x1024": (1024, 1024), "1280x960": (960, 1280)}  # name (W×H) → tensor (H, W)
MODELS = ("CflowAD", "FastFlow", "CSFlow")
SETTINGS = {
    "CflowAD": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "fiber_batch_size": 256},
    "FastFlow": {"backbone": "efficientnet_lite0", "layers": ["blocks.1", "blocks.2", "blocks.4"]},
    "CSFlow": {"backbone": "efficientnet_lite0", "layer": "blocks.4"},
}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(model_name: str, size: tuple[int, int], mode: str, batch_size: int, chunk: int | None) -> dict:
    """In this process: build, warm up, then time one ``mode`` pass and report its peak RSS."""
    import torch

    import flowad_plugins
    from flowad_plugins.scoring import gaussian_log_likelihood

    torch.manual_seed(0)
    rss_imports = _rss_mib("VmRSS")
    settings = dict(SETTINGS[model_name])
    if model_name == "FastFlow":
        settings["input_size"] = size
    if model_name == "CflowAD" and chunk is not None:
        settings["inference_chunk_size"] = chunk
    module = getattr(flowad_plugins, model_name)(**settings)
    model = module.model
    images = torch.rand(batch_size, 3, *size)
    rss_model = _rss_mib("VmRSS")

    def inference() -> None:
        model.eval()
        with torch.inference_mode():
            output = model(images)
        assert torch.isfinite(output.anomaly_map).all()

    optimizer = None

    def train_step() -> None:
        nonlocal optimizer
        model.train()
        if optimizer is None:
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        optimizer.zero_grad(set_to_none=True)
        if model_name == "CflowAD":
            with torch.no_grad():
                features = model.encoder(images)
            loss = torch.zeros(())
            for layer, feature_map in enumerate(features):
                fibers, positions = model.fibers(feature_map)
                index = torch.randperm(fibers.shape[0])[: module.fiber_batch_size]
                log_likelihood = model.fiber_log_likelihood(layer, fibers[index], positions[index],
                                                            tuple(feature_map.shape[-2:]))
                loss = loss - torch.nn.functional.logsigmoid(log_likelihood).mean()
        elif model_name == "FastFlow":
            loss = sum(-gaussian_log_likelihood(z, log_det).mean() for z, log_det in model(images))
        else:
            latents, log_jac_det = model(images)
            squared = sum(z.pow(2).flatten(1).sum(dim=1) for z in latents)
            loss = ((0.5 * squared - log_jac_det) / sum(z[0].numel() for z in latents)).mean()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)

    run = inference if mode == "inference" else train_step
    run()  # warm-up: allocator pools, oneDNN primitives, CflowAD's condition cache
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = _rss_mib("VmHWM")
    return {"model": model_name, "size": f"{size[1]}x{size[0]}", "mode": mode, "batch_size": batch_size,
            "inference_chunk_size": chunk if model_name == "CflowAD" else None, "seconds": round(seconds, 2),
            "rss_after_imports_mib": round(rss_imports, 1), "rss_model_built_mib": round(rss_model, 1),
            "peak_rss_mib": round(peak, 1), "pass_peak_mib": round(peak - rss_model, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=["inference", "train_step"], choices=["inference", "train_step"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="inference batch sizes")
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cflow-chunks", type=int, nargs="+", default=[65536, 4096],
                        help="CflowAD inference_chunk_size values to measure at inference")
    parser.add_argument("--child", nargs=5, metavar=("MODEL", "H", "W", "MODE", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_name, height, width, mode, chunk = args.child
        result = measure(model_name, (int(height), int(width)), mode, args.batch_size,
                         None if chunk == "none" else int(chunk))
        print("RESULT " + json.dumps(result))
        return

    from tqdm import tqdm

    jobs = []
    for model_name in args.models:
        for size_name in args.sizes:
            for mode in args.modes:
                chunks = args.cflow_chunks if model_name == "CflowAD" and mode == "inference" else [None]
                batches = args.batch_sizes if mode == "inference" else [1]
                jobs += [(model_name, SIZES[size_name], mode, chunk, batch) for batch in batches for chunk in chunks]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    results = []
    for model_name, size, mode, chunk, batch in tqdm(jobs, desc="fresh-process measurements", unit="run"):
        command = [sys.executable, __file__, "--batch-size", str(batch), "--child", model_name,
                   str(size[0]), str(size[1]), mode, "none" if chunk is None else str(chunk)]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=REPO)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            result = {"model": model_name, "size": f"{size[1]}x{size[0]}", "mode": mode,
                      "error": completed.stderr.strip()[-1500:]}
        else:
            result = json.loads(lines[-1].removeprefix("RESULT "))
        results.append(result)
        tqdm.write(json.dumps(result))

    import torch
    from harness.machine import machine_info

    machine = {**machine_info(int(env["OMP_NUM_THREADS"])), "torch": torch.__version__}
    command = "python benchmarks/large_images.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "large_images_cpu.json").write_text(json.dumps({"machine": machine, "command": command,
                                                               "results": results}, indent=1) + "\n")
    rows = ["| model | frame (W×H) | pass | batch | CflowAD chunk | s | RSS imports MiB | RSS model built MiB | "
            "process peak MiB | pass peak MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['size']} | {r['mode']} | | | error: {r['error'][-200:]!r} | | | | |")
            continue
        rows.append(f"| {r['model']} | {r['size']} | {r['mode']} | {r['batch_size']} | "
                    f"{r['inference_chunk_size'] or '–'} | {r['seconds']} | {r['rss_after_imports_mib']} | "
                    f"{r['rss_model_built_mib']} | {r['peak_rss_mib']} | {r['pass_peak_mib']} |")
    markdown = (
        f"# Large frames: peak memory and time per pass, CPU\n\nMachine: {machine['cpu']}, {machine['threads']} "
        f"threads, torch {machine['torch']}. Command: `{command}`.\n\n"
        "Fresh process per row (one warm-up and one timed pass; s = the timed pass). RSS imports: resident "
        "memory after importing torch/anomalib; model built: after building the model and the input batch; "
        "process peak: the kernel's high-water mark (VmHWM) over the whole process; pass peak = process peak − "
        "model built, the most a pass needed on top of the model.\n\n"
        + "\n".join(rows) + "\n"
    )
    (RESULTS / "large_images_cpu.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: harness, evaluate
    main()
