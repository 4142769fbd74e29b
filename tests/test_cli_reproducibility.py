"""The anomalib CLI, in subprocesses: seeded runs repeat exactly, a resumed run ends where the uninterrupted one ends.

anomalib's CLI never applies ``--seed_everything``, so the models take ``--model.seed`` (set in our configs), and
the configs give the datamodule ``seed: 0`` (kept when ``--data`` names another datamodule). Resume is
``anomalib fit --ckpt_path <model.ckpt>`` then ``anomalib test --ckpt_path <the resumed run's model.ckpt>``
(``anomalib train --ckpt_path`` would test the starting checkpoint).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SYNTHETIC_CLI_DATA

METRIC_ROW = re.compile(r"│\s*((?:image|pixel)_\w+)\s*│\s*([-+0-9.eE]+|nan)\s*│")
IMAGE_SIZE = 64

TINY_MODEL_ARGS = {
    "CflowAD": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "coupling_blocks": 2,
                "condition_dim": 16, "fiber_batch_size": 64, "permute_soft": False},
    "FastFlow": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "flow_steps": 2},
    "CSFlow": {"backbone": "efficientnet_lite0", "layer": "blocks.2", "coupling_blocks": 2, "hidden_channels": 16},
}
# stops a fit cleanly after its first epoch (train_loss < 1e30 always holds): an interruption at an epoch boundary
STOP_AFTER_FIRST_EPOCH = {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                          "init_args": {"monitor": "train_loss", "stopping_threshold": 1.0e30,
                                        "check_on_train_epoch_end": True}}


def anomalib(subcommand: str, args: list[str], root_dir: Path) -> tuple[str, dict[str, float]]:
    """Run ``anomalib <subcommand> <args>`` with results under ``root_dir``; return its output and test metrics."""
    command = [str(Path(sys.executable).with_name("anomalib")), subcommand, *args,
               "--trainer.enable_progress_bar", "false", "--default_root_dir", str(root_dir)]
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root_dir.parent, env=env,
                            check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output, {name: float(value) for name, value in METRIC_ROW.findall(output)}


def only_checkpoint(root_dir: Path) -> Path:
    """The one ``model.ckpt`` a run under ``root_dir`` wrote (anomalib's ``.../weights/lightning/model.ckpt``)."""
    checkpoints = sorted(root_dir.rglob("model.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    return checkpoints[0]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's ``state_dict`` (flow weights, normal-data statistics, thresholds)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(first: Path, second: Path) -> None:
    expected, actual = weights(first), weights(second)
    assert expected.keys() == actual.keys()
    differing = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def tiny_config(path: Path, name: str, epochs: int, callbacks: list[dict] | None = None) -> Path:
    """A YAML config: the tiny ``name`` at 64 px with ``seed: 0``, ``epochs`` epochs on CPU."""
    transforms = [{"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [IMAGE_SIZE, IMAGE_SIZE]}},
                  {"class_path": "torchvision.transforms.v2.Normalize",
                   "init_args": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}]
    pre_processor = {"class_path": "anomalib.pre_processing.PreProcessor",
                     "init_args": {"transform": {"class_path": "torchvision.transforms.v2.Compose",
                                                 "init_args": {"transforms": transforms}}}}
    config = {"model": {"class_path": f"flowad_plugins.{name}",
                        "init_args": {**TINY_MODEL_ARGS[name], "seed": 0, "pre_processor": pre_processor}},
              "trainer": {"max_epochs": epochs, "accelerator": "cpu", "devices": 1,
                          **({"callbacks": callbacks} if callbacks else {})}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", sorted(TINY_MODEL_ARGS))
def test_resumed_cli_run_reports_the_uninterrupted_runs_model(name: str, synthetic_root: Path, tmp_path: Path) -> None:
    """``train`` 2 epochs == ``fit`` stopped after epoch 1, ``fit --ckpt_path`` to 2, ``test --ckpt_path``: same
    weights (bit-exact: the seed and the checkpointed random states carry across processes) and same metrics."""
    data = [*SYNTHETIC_CLI_DATA, "--data.root", str(synthetic_root)]
    full_config = tiny_config(tmp_path / "full.yaml", name, epochs=2)
    stopped_config = tiny_config(tmp_path / "stopped.yaml", name, epochs=2, callbacks=[STOP_AFTER_FIRST_EPOCH])

    _, full_metrics = anomalib("train", ["--config", str(full_config), *data], tmp_path / "full")
    anomalib("fit", ["--config", str(stopped_config), *data], tmp_path / "stopped")
    stopped = only_checkpoint(tmp_path / "stopped")
    assert torch.load(stopped, map_location="cpu", weights_only=False)["epoch"] == 0
    anomalib("fit", ["--config", str(full_config), *data, "--ckpt_path", str(stopped)], tmp_path / "resumed")
    resumed = only_checkpoint(tmp_path / "resumed")
    _, resumed_metrics = anomalib("test", ["--config", str(full_config), *data, "--ckpt_path", str(resumed)],
                                  tmp_path / "tested")

    assert_same_weights(only_checkpoint(tmp_path / "full"), resumed)
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"} <= set(full_metrics)
    assert resumed_metrics == full_metrics


def test_same_train_command_twice_on_mvtec_layout_gives_the_same_model(synthetic_root: Path, tmp_path: Path) -> None:
    """``anomalib train --config configs/cflow_ad_efficientnet_lite0.yaml --data anomalib.data.MVTecAD`` twice, no
    ``--data.seed`` given (the config's seed is kept): identical weights and metrics (validation split from test)."""
    args = ["--config", str(REPO / "configs" / "cflow_ad_efficientnet_lite0.yaml"), "--model.coupling_blocks", "2",
            "--model.condition_dim", "16", "--model.fiber_batch_size", "64", "--trainer.max_epochs", "1",
            "--data", "anomalib.data.MVTecAD", "--data.root", str(synthetic_root), "--data.category", "surface",
            "--data.num_workers", "0", "--data.train_batch_size", "8", "--data.val_split_mode", "from_test"]
    _, first = anomalib("train", args, tmp_path / "first")
    _, second = anomalib("train", args, tmp_path / "second")
    assert_same_weights(only_checkpoint(tmp_path / "first"), only_checkpoint(tmp_path / "second"))
    assert "image_AUROC" in first
    assert first == second


def normal_images_tested(root_dir: Path) -> set[str]:
    """Names of the normal images a run tested (anomalib's visualizer writes one file per tested image)."""
    return {path.name for path in root_dir.rglob("images/good/*.png")}


def test_folder_split_is_the_same_in_train_and_a_later_test(synthetic_root: Path, tmp_path: Path) -> None:
    """Folder with normal test images split off the normal folder: a later ``anomalib test`` tests the same
    images as ``anomalib train`` did (the config's ``data.seed``), and the trained model (same metrics)."""
    images = tmp_path / "dataset"
    shutil.copytree(synthetic_root / "surface" / "train" / "good", images / "good")
    shutil.copytree(synthetic_root / "surface" / "test" / "crack", images / "crack")
    args = ["--config", str(REPO / "configs" / "fastflow_efficientnet_lite0.yaml"), "--model.layers", "[blocks.2]",
            "--model.flow_steps", "2", "--model.input_size", f"[{IMAGE_SIZE},{IMAGE_SIZE}]",
            "--trainer.max_epochs", "1", "--data", "anomalib.data.Folder", "--data.name", "generated",
            "--data.root", str(images), "--data.normal_dir", "good", "--data.abnormal_dir", "crack",
            "--data.normal_split_ratio", "0.25", "--data.num_workers", "0", "--data.train_batch_size", "8"]
    _, trained = anomalib("train", args, tmp_path / "train")
    _, tested = anomalib("test", [*args, "--ckpt_path", str(only_checkpoint(tmp_path / "train"))], tmp_path / "test")
    normal_test_images = normal_images_tested(tmp_path / "train")
    assert normal_test_images  # 25 % of the 16 normal images, half of them then split off for validation
    assert normal_images_tested(tmp_path / "test") == normal_test_images
    assert trained == tested
