"""The anomalib CLI trains and tests our plugin in a subprocess: ``anomalib train --model flowad_plugins.CflowAD``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ANOMALIB = Path(sys.executable).with_name("anomalib")


@pytest.mark.parametrize("config", [None, "configs/cflow_ad_efficientnet_lite0.yaml"])
def test_anomalib_train_cli_runs_our_model(synthetic_root: Path, tmp_path: Path, config: str | None) -> None:
    model_args = ["--model", "flowad_plugins.CflowAD", "--model.backbone", "efficientnet_lite0",
                  "--model.layers", "[blocks.2, blocks.4]", "--model.coupling_blocks", "2"]
    command = [
        str(ANOMALIB), "train",
        *(["--config", str(REPO / config)] if config else model_args),
        "--data", "flowad_plugins.data.SyntheticAD",
        "--data.root", str(synthetic_root), "--data.image_size", "128", "--data.num_train", "16",
        "--data.num_test_good", "4", "--data.num_test_per_defect", "3", "--data.train_batch_size", "8",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--default_root_dir", str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "image_AUROC" in output and "pixel_AUPRO" in output
    assert list(tmp_path.rglob("*.ckpt")), "no checkpoint written"
