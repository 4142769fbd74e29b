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


REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CLI_DATA = ["--data", "flowad_plugins.data.SyntheticAD", "--data.image_size", "128", "--data.num_train", "16",
                      "--data.num_test_good", "4", "--data.num_test_per_defect", "3", "--data.train_batch_size", "8"]


def synthetic_datamodule(root: Path):
    """SyntheticAD over the session's generated 128-px data (16 train, batch 8)."""
    from flowad_plugins.data import SyntheticAD

    return SyntheticAD(root=root, category="surface", image_size=128, num_train=16, num_test_good=4,
                       num_test_per_defect=3, train_batch_size=8, eval_batch_size=8)


def fit_and_test(model, root: Path, tmp_path: Path, epochs: int = 3):
    """Seeded Engine fit + test of ``model`` on the generated data; returns (engine, datamodule, test metrics)."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(0)
    datamodule = synthetic_datamodule(root)
    engine = Engine(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path,
                    enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    return engine, datamodule, engine.test(model=model, datamodule=datamodule, verbose=False)[0]


def run_anomalib_train(model_args: list[str], root: Path, tmp_path: Path) -> str:
    """Run ``anomalib train`` in a subprocess on the generated data for 1 epoch; assert it tested and saved."""
    import subprocess
    import sys

    command = [str(Path(sys.executable).with_name("anomalib")), "train", *model_args, *SYNTHETIC_CLI_DATA,
               "--data.root", str(root), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
               "--default_root_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "image_AUROC" in output and "pixel_AUPRO" in output
    assert list(tmp_path.rglob("*.ckpt")), "no checkpoint written"
    return output
