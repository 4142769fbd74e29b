"""Two runs with the same seed give the same metrics, for each of the three models (issue: determinism)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_CFLOW, fit_and_test

TINY_SETTINGS = {
    "CflowAD": TINY_CFLOW,
    "FastFlow": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "flow_steps": 2,
                 "input_size": (128, 128)},
    "CSFlow": {"backbone": "efficientnet_lite0", "layer": "blocks.2", "coupling_blocks": 2, "hidden_channels": 16},
}


@pytest.mark.parametrize("name", sorted(TINY_SETTINGS))
def test_same_seed_gives_the_same_metrics(name: str, synthetic_root: Path, tmp_path: Path) -> None:
    from lightning.pytorch import seed_everything

    import flowad_plugins

    def run(folder: str) -> dict[str, float]:
        seed_everything(0)  # before construction: flow initialisation and permutations are random too
        model_class = getattr(flowad_plugins, name)
        extra = {"pre_processor": model_class.configure_pre_processor((128, 128))} if name == "CSFlow" else {}
        _, _, metrics = fit_and_test(model_class(**TINY_SETTINGS[name], **extra), synthetic_root,
                                     tmp_path / folder, epochs=2)
        return {key: float(value) for key, value in metrics.items()}

    first, second = run("first"), run("second")
    assert set(first) >= {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"}
    assert first == second
