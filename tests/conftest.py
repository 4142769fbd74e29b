"""Shared fixtures: a tiny generated dataset and tiny model settings that train in seconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REAL_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"

# efficientnet_lite0 with offline ImageNet weights, two layers, a small flow: fast and real.
TINY_CFLOW = {
    "backbone": "efficientnet_lite0",
    "layers": ["blocks.2", "blocks.4"],
    "coupling_blocks": 2,
    "condition_dim": 16,
    "fiber_batch_size": 64,
    "permute_soft": False,
}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding the generated ``surface`` category at 128 px (generated once per session)."""
    from flowad_plugins.data import SyntheticSpec, generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, SyntheticSpec(category="surface", image_size=128, num_train=16, num_test_good=4,
                                         num_test_per_defect=3))
    return root


@pytest.fixture
def tiny_datamodule(synthetic_root: Path):
    """SyntheticAD over the session's generated data, batch size 8."""
    from flowad_plugins.data import SyntheticAD

    return SyntheticAD(root=synthetic_root, category="surface", image_size=128, num_train=16, num_test_good=4,
                       num_test_per_defect=3, train_batch_size=8, eval_batch_size=8)
