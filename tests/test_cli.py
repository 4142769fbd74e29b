"""The anomalib CLI trains and tests our plugin in a subprocess: ``anomalib train --model flowad_plugins.CflowAD``."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, run_anomalib_train


@pytest.mark.parametrize("config", [None, "configs/cflow_ad_efficientnet_lite0.yaml"])
def test_anomalib_train_cli_runs_our_model(synthetic_root: Path, tmp_path: Path, config: str | None) -> None:
    model_args = ["--model", "flowad_plugins.CflowAD", "--model.backbone", "efficientnet_lite0",
                  "--model.layers", "[blocks.2, blocks.4]", "--model.coupling_blocks", "2"]
    run_anomalib_train(["--config", str(REPO / config)] if config else model_args, synthetic_root, tmp_path)
