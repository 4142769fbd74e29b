"""Install size and cold start of the torch-free ``flowad-predict`` next to anomalib's ``OpenVINOInferencer``.

1. Fits a small CflowAD (efficientnet_lite0, blocks.2 + blocks.4) for 1 epoch on generated data and exports it
   with ``Engine.export`` to OpenVINO IR at 256×256 (or takes ``--model model.xml``).
2. Creates a fresh venv (``python -m venv``), installs ``openvino numpy pillow`` (the versions of this venv) and
   this repository with ``--no-deps``; measures its site-packages with ``du``.
3. Cold start = wall time from process start to exit after one prediction on one image, median of ``--repeats``
   runs, each in a new empty working directory (no OpenVINO model cache), the two commands alternating:
   ``flowad-predict`` from the fresh venv, and ``OpenVINOInferencer`` from this venv (imports anomalib and torch).
   Both compile with ``INFERENCE_PRECISION_HINT=f32``.

``python benchmarks/edge_runtime.py`` writes ``benchmarks/results/edge_runtime.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: harness
from harness.machine import machine_info
from harness.timing import interleaved_wall_times, median_ms

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNTIME_PACKAGES = ("openvino", "numpy", "pillow")
INFERENCER_CODE = (
    "import sys; from anomalib.data.utils import read_image; from anomalib.deploy import OpenVINOInferencer; "
    "inferencer = OpenVINOInferencer(sys.argv[1], device='CPU', config={'INFERENCE_PRECISION_HINT': 'f32'}); "
    "print(float(inferencer.predict(read_image(sys.argv[2], as_tensor=True)).pred_score.reshape(-1)[0]))"
)


def export_small_model(workdir: Path, size: int) -> Path:
    """Fit a small CflowAD for 1 epoch on generated data and export it to OpenVINO IR at ``size``×``size``."""
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from flowad_plugins import CflowAD
    from flowad_plugins.data import SyntheticAD, SyntheticSpec, generate_dataset

    generate_dataset(workdir / "data", SyntheticSpec(category="surface", image_size=size, num_train=16,
                                                     num_test_good=4, num_test_per_defect=3))
    seed_everything(0)
    model = CflowAD(backbone="efficientnet_lite0", layers=["blocks.2", "blocks.4"], coupling_blocks=4,
                    condition_dim=64)
    model.pre_processor = model.configure_pre_processor((size, size))
    datamodule = SyntheticAD(root=workdir / "data", category="surface", image_size=size, num_train=16,
                             num_test_good=4, num_test_per_defect=3, train_batch_size=8, eval_batch_size=8)
    engine = Engine(max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=workdir / "fit",
                    enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    return Path(engine.export(model.eval(), ExportType.OPENVINO, export_root=workdir / "export",
                              input_size=(size, size)))


def make_runtime_venv(folder: Path) -> tuple[Path, list[str]]:
    """Fresh venv with openvino, numpy, pillow and this package (``--no-deps``); returns (its python, commands)."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    pins = [f"{name}=={version(name)}" for name in RUNTIME_PACKAGES]
    commands = [[str(python), "-m", "pip", "install", "-q", *pins],
                [str(python), "-m", "pip", "install", "-q", "--no-deps", str(REPO)]]
    for command in commands:
        subprocess.run(command, check=True, timeout=1800)
    shown = [f"python -m venv {folder.name}", f"{folder.name}/bin/pip install {' '.join(pins)}",
             f"{folder.name}/bin/pip install --no-deps ."]
    return python, shown


def site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def du_bytes(path: Path) -> int:
    """Disk usage of ``path`` in bytes (``du -sb``)."""
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def run_in_empty_folder(command: list[str]) -> None:
    """Run ``command`` in a new empty working directory (no model cache); fail loudly on a non-zero exit."""
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-3000:]}")



def rewrite_report(json_path: Path) -> None:
    """Regenerate the Markdown next to ``json_path`` from it (no measuring)."""
    json_path.with_suffix(".md").write_text(report(json.loads(json_path.read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="IR to use (default: fit and export a small one)")
    parser.add_argument("--size", type=int, default=256, help="input size of the exported small model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "edge_runtime.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        ir_path = args.model or export_small_model(scratch / "model", args.size)
        image = next((scratch / "model" / "data").rglob("*.png")) if args.model is None else None
        if image is None:
            from PIL import Image

            image = scratch / "image.png"
            Image.new("RGB", (args.size, args.size), (128, 128, 128)).save(image)
        python, install_commands = make_runtime_venv(scratch / "edge-venv")
        runtime_site = site_packages(python)
        sizes = {entry.name: du_bytes(entry) for entry in runtime_site.iterdir()}
        edge_command = [str(python.with_name("flowad-predict")), str(ir_path), str(image), "--out", "results"]
        anomalib_command = [sys.executable, "-c", INFERENCER_CODE, str(ir_path), str(image)]
        commands = {"flowad-predict": edge_command, "OpenVINOInferencer": anomalib_command}
        calls = [lambda command=command: run_in_empty_folder(command) for command in commands.values()]
        times = dict(zip(commands, interleaved_wall_times(calls, warmup=0, repeats=args.repeats), strict=True))
        record = {
            **machine_info(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)),
            "versions": {name: version(name) for name in (*RUNTIME_PACKAGES, "anomalib", "torch")},
            "model": "CflowAD efficientnet_lite0 [blocks.2, blocks.4], 4 coupling blocks, condition 64, "
                     f"{args.size}x{args.size} FP32 IR" if args.model is None else str(args.model),
            "ir_bytes": du_bytes(Path(ir_path)) + du_bytes(Path(ir_path).with_suffix(".bin")),
            "install_commands": install_commands,
            "edge_site_packages_bytes": du_bytes(runtime_site),
            "edge_largest_entries_bytes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:6]),
            "anomalib_venv_site_packages_bytes": du_bytes(site_packages(Path(sys.executable))),
            "cold_start_commands": {"flowad-predict": "flowad-predict model.xml image.png --out results",
                                    "OpenVINOInferencer": f"python -c \"{INFERENCER_CODE}\" model.xml image.png"},
            "cold_start_seconds": times,
            "cold_start_median_seconds": {name: median_ms(values) / 1e3 for name, values in times.items()},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(record))
    print(report(record))


def report(record: dict) -> str:
    mib = 1024 * 1024
    medians = record["cold_start_median_seconds"]
    rows = ["| | install (site-packages) | cold start, median of 5 (all runs) |", "|---|---|---|"]
    labels = {"flowad-predict": ("`flowad-predict` (openvino + numpy + pillow)", record["edge_site_packages_bytes"]),
              "OpenVINOInferencer": ("anomalib `OpenVINOInferencer` (full venv with torch)",
                                     record["anomalib_venv_site_packages_bytes"])}
    for name, (label, size) in labels.items():
        runs = ", ".join(f"{t:.2f}" for t in record["cold_start_seconds"][name])
        rows.append(f"| {label} | {size / mib:.0f} MiB | {medians[name]:.2f} s ({runs}) |")
    largest = ", ".join(f"{name} {size / mib:.0f} MiB" for name, size in record["edge_largest_entries_bytes"].items())
    return "\n".join([
        "# Torch-free runtime: install size and cold start",
        "",
        f"CPU: {record['cpu']} ({record['cores_visible']} cores visible, shared; 1-min load average at the end "
        f"{record['load_average_1min_at_end']:.1f}; OMP_NUM_THREADS={record['omp_num_threads']}). "
        f"Python {record['python']}; "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + ".",
        f"Model: {record['model']} ({record['ir_bytes'] / mib:.1f} MiB).",
        "",
        *rows,
        "",
        "Cold start: wall time from process start to exit after one prediction on one image (compile included, "
        "new empty working directory each run, so no OpenVINO cache; the two commands alternate). "
        "The anomalib column is the whole venv this project installs (torch, anomalib, lightning, ...), not "
        "only what `OpenVINOInferencer` needs.",
        "",
        f"Largest entries of the runtime venv's site-packages: {largest}.",
        "",
        "Install: " + "; ".join(f"`{c}`" for c in record["install_commands"]),
        "",
        "Commands timed: " + "; ".join(f"`{c}`" for c in record["cold_start_commands"].values()),
        "",
        "Reproduce: `python benchmarks/edge_runtime.py`.",
        "",
    ])


if __name__ == "__main__":
    main()
