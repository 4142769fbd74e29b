"""Shared fixtures: a tiny generated dataset and the one table of tiny model settings that train in seconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ("contract_fixtures",)  # the contract modules' shared fixtures

REPO = Path(__file__).resolve().parents[1]
REAL_DATA_ROOT = REPO.parent / "shared" / "data" / "mvtec_ad"

MODEL_NAMES = ("CflowAD", "FastFlow", "CSFlow")
# Tiny settings of each model: efficientnet_lite0 (offline ImageNet weights), small flows. Fast and real.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "CflowAD": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "coupling_blocks": 2,
                "condition_dim": 16, "fiber_batch_size": 64, "permute_soft": False},
    "FastFlow": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "flow_steps": 2},
    # layer blocks.2: stride 8, 40 channels; sizes must be multiples of 32 (128 px → 16, 8, 4 positions)
    "CSFlow": {"backbone": "efficientnet_lite0", "layer": "blocks.2", "coupling_blocks": 2, "hidden_channels": 16,
               "kernel_sizes": [3, 5]},
}
TINY_CFLOW = TINY_CONFIGS["CflowAD"]


def tiny_model(name: str, input_size: tuple[int, int] = (128, 128), **overrides: Any):
    """The tiny ``name`` model (``TINY_CONFIGS``) for ``input_size`` images."""
    import flowad_plugins

    return getattr(flowad_plugins, name)(**{**TINY_CONFIGS[name], "input_size": input_size, **overrides})


def tiny_cli_args(name: str) -> list[str]:
    """``--model`` arguments of the anomalib CLI that build the tiny ``name`` model (without its input size)."""
    args = ["--model", f"flowad_plugins.{name}"]
    for key, value in TINY_CONFIGS[name].items():
        text = f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value).lower() if isinstance(
            value, bool) else str(value)
        args += [f"--model.{key}", text]
    return args


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
    return synthetic_datamodule(synthetic_root)


SYNTHETIC_CLI_DATA = ["--data", "flowad_plugins.data.SyntheticAD", "--data.image_size", "128", "--data.num_train", "16",
                      "--data.num_test_good", "4", "--data.num_test_per_defect", "3", "--data.train_batch_size", "8"]


def synthetic_datamodule(root: Path):
    """SyntheticAD over the session's generated 128-px data (16 train, batch 8)."""
    from flowad_plugins.data import SyntheticAD

    return SyntheticAD(root=root, category="surface", image_size=128, num_train=16, num_test_good=4,
                       num_test_per_defect=3, train_batch_size=8, eval_batch_size=8)


def tiny_engine(folder: Path, epochs: int = 1, **kwargs: Any):
    """A quiet CPU ``Engine`` writing under ``folder``."""
    from anomalib.engine import Engine

    return Engine(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, default_root_dir=folder,
                  enable_progress_bar=False, **kwargs)


def fit_and_test(model, root: Path, tmp_path: Path, epochs: int = 3):
    """Seeded Engine fit + test of ``model`` on the generated data; returns (engine, datamodule, test metrics)."""
    from lightning.pytorch import seed_everything

    seed_everything(0)
    datamodule = synthetic_datamodule(root)
    engine = tiny_engine(tmp_path, epochs)
    engine.fit(model=model, datamodule=datamodule)
    return engine, datamodule, engine.test(model=model, datamodule=datamodule, verbose=False)[0]


def run_anomalib(command: list[str], cwd: Path, timeout: int = 600) -> str:
    """Run ``anomalib <command>`` in a subprocess (offline); assert it succeeded and return its output."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([str(Path(sys.executable).with_name("anomalib")), *command], capture_output=True,
                            text=True, timeout=timeout, cwd=cwd, check=False, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def run_anomalib_train(model_args: list[str], root: Path, tmp_path: Path) -> str:
    """Run ``anomalib train`` in a subprocess on the generated data for 1 epoch; assert it tested and saved."""
    output = run_anomalib(["train", *model_args, *SYNTHETIC_CLI_DATA, "--data.root", str(root),
                           "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                           "--default_root_dir", str(tmp_path)], tmp_path)
    assert "image_AUROC" in output and "pixel_AUPRO" in output
    assert list(tmp_path.rglob("*.ckpt")), "no checkpoint written"
    return output
