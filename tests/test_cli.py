"""Configs and the anomalib CLI: every config names valid arguments; one config trains through ``anomalib train``.

The CLI paths of all three models (train at a non-default size, test/predict/export from the checkpoint) are in
``test_contract.py``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from conftest import REPO, run_anomalib_train

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_config_names_valid_arguments_and_builds_offline(config: str) -> None:
    import yaml

    import flowad_plugins

    settings = yaml.safe_load((REPO / "configs" / config).read_text())
    class_path = settings["model"]["class_path"]
    assert class_path.startswith("flowad_plugins."), class_path
    model_class = getattr(flowad_plugins, class_path.rsplit(".", 1)[-1])
    init = dict(settings["model"].get("init_args") or {})
    unknown = set(init) - set(inspect.signature(model_class).parameters)
    assert not unknown, f"{config}: {model_class.__name__} has no arguments {sorted(unknown)}"
    if init.get("backbone") == "efficientnet_lite0":  # offline weights: it must build as written
        model = model_class(**init)
        assert model.hparams["input_size"] == list(model.input_size)


def test_anomalib_train_cli_runs_a_config(synthetic_root: Path, tmp_path: Path) -> None:
    run_anomalib_train(["--config", str(REPO / "configs" / "cflow_ad_efficientnet_lite0.yaml")], synthetic_root,
                       tmp_path)
