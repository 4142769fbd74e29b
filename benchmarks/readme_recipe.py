r"""The README's own-images recipe, run as a user would, on a small part of MVTec AD bottle; counts what the IR flags.

A ``Folder`` dataset of 60 normal images (bottle's first 60 train/good) and 10 defective ones with masks (the first
3–4 of each test defect type), trained with ``anomalib train --config configs/<model>.yaml ... --data.val_split_mode
synthetic --data.val_split_ratio 0.2`` (the config's epochs), exported with ``anomalib export ... --compression_type
FP16``, then ``flowad-predict`` on the 10 defective images and on bottle's 20 test/good images (never trained on).
Records flagged counts, median normalised scores, what ``--threshold 0.6`` flags, and the end-of-training threshold
summary. Writes ``--out`` (JSON and Markdown)::

    OMP_NUM_THREADS=2 python benchmarks/readme_recipe.py --models CflowAD FastFlow CSFlow
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from tempfile import mkdtemp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
CONFIGS = {"CflowAD": "cflow_ad_efficientnet_lite0.yaml", "FastFlow": "fastflow_efficientnet_lite0.yaml",
           "CSFlow": "csflow_efficientnet_lite0.yaml"}
DEFECTS = {"broken_large": 4, "broken_small": 3, "contamination": 3}


def make_dataset(root: Path) -> None:
    """``root/{good,defect,mask}`` as the README lays them out."""
    for folder in ("good", "defect", "mask"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:60]:
        shutil.copy(path, root / "good" / path.name)
    for kind, count in DEFECTS.items():
        for path in sorted((BOTTLE / "test" / kind).glob("*.png"))[:count]:
            shutil.copy(path, root / "defect" / f"{kind}_{path.name}")
            shutil.copy(BOTTLE / "ground_truth" / kind / f"{path.stem}_mask.png",
                        root / "mask" / f"{kind}_{path.stem}_mask.png")


def run(command: list[str], cwd: Path) -> str:
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(output[-4000:])
    return output


def predictions(model_xml: Path, images: Path, out: Path, cwd: Path, threshold: float | None = None) -> list[dict]:
    extra = [] if threshold is None else ["--threshold", str(threshold)]
    run([str(Path(sys.executable).with_name("flowad-predict")), str(model_xml), str(images), "--out", str(out),
         "--no-overlays", *extra], cwd)
    return json.loads((out / "results.json").read_text())["results"]


def recipe(name: str, work: Path) -> dict:
    folder = work / name
    anomalib = str(Path(sys.executable).with_name("anomalib"))
    config = str(REPO / "configs" / CONFIGS[name])
    data = ["--data", "anomalib.data.Folder", "--data.name", "my_part", "--data.root", str(work / "my_part"),
            "--data.normal_dir", "good", "--data.abnormal_dir", "defect", "--data.mask_dir", "mask",
            "--data.val_split_mode", "synthetic", "--data.val_split_ratio", "0.2", "--data.seed", "0"]
    train_log = run([anomalib, "train", "--config", config, *data, "--trainer.enable_progress_bar", "false",
                     "--default_root_dir", str(folder / "results")], work)
    checkpoint = next((folder / "results").rglob("model.ckpt"))
    run([anomalib, "export", "--config", config, "--ckpt_path", str(checkpoint), "--export_type", "openvino",
         "--compression_type", "FP16", "--export_root", str(folder / "exported")], work)
    xml = next((folder / "exported").rglob("model.xml"))
    defects = predictions(xml, work / "my_part" / "defect", folder / "pred_defect", work)
    normals = predictions(xml, BOTTLE / "test" / "good", folder / "pred_good", work)
    stricter = predictions(xml, work / "my_part" / "defect", folder / "pred_defect_06", work, threshold=0.6)
    stricter_normals = predictions(xml, BOTTLE / "test" / "good", folder / "pred_good_06", work, threshold=0.6)
    summary = [line for line in train_log.splitlines() if "threshold" in line.lower() and "|" not in line]

    def flagged(rows: list[dict]) -> str:
        return f"{sum(bool(row['label']) for row in rows)}/{len(rows)}"

    return {"model": name, "config": f"configs/{CONFIGS[name]}",
            "flagged_defects": flagged(defects), "flagged_test_good": flagged(normals),
            "median_score_defects": round(statistics.median(row["score"] for row in defects), 3),
            "median_score_test_good": round(statistics.median(row["score"] for row in normals), 3),
            "threshold_0.6_flagged_defects": flagged(stricter),
            "threshold_0.6_flagged_test_good": flagged(stricter_normals),
            "threshold_summary": summary[-6:]}


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# The README recipe on 60 normal + 10 defective bottle images (exported FP16 IR, `flowad-predict`)", "",
             f"`{command}`; machine: {cpu_model()}.", "",
             "| model | defects flagged | test/good flagged | median score defects / test good | at `--threshold "
             "0.6`: defects / good |", "|---|---:|---:|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['flagged_defects']} | {row['flagged_test_good']} | "
                     f"{row['median_score_defects']:.3f} / {row['median_score_test_good']:.3f} | "
                     f"{row['threshold_0.6_flagged_defects']} / {row['threshold_0.6_flagged_test_good']} |")
    lines += ["", "End-of-training threshold summaries:", ""]
    for row in rows:
        lines += [f"- {row['model']}:", "  ```", *[f"  {line}" for line in row["threshold_summary"]], "  ```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "readme_recipe")
    args = parser.parse_args()
    if not BOTTLE.exists():
        raise SystemExit(f"needs MVTec AD bottle at {BOTTLE}")
    work = Path(mkdtemp(prefix="recipe_"))
    make_dataset(work / "my_part")
    path = args.out.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {row["model"]: row for row in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    for name in args.models:
        rows[name] = recipe(name, work)
        print(json.dumps(rows[name], indent=1), flush=True)
        ordered = [rows[n] for n in CONFIGS if n in rows]
        path.write_text(json.dumps({"machine": cpu_model(), "rows": ordered}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(ordered, "python benchmarks/readme_recipe.py "
                                                        + " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
