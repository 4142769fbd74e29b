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



def _readme_layout(root: Path) -> Path:
    """The README's folder layout (good/defect/mask) of generated 64-px images under ``root/my_part``."""
    import shutil

    from flowad_plugins.data import SyntheticSpec, generate_dataset

    generated = generate_dataset(root / "generated", SyntheticSpec(category="surface", image_size=64, num_train=8,
                                                                   num_test_good=1, num_test_per_defect=3))
    part = root / "my_part"
    defect = next(p for p in sorted((generated / "test").iterdir()) if p.name != "good")
    shutil.copytree(generated / "train" / "good", part / "good")
    shutil.copytree(defect, part / "defect")
    shutil.copytree(generated / "ground_truth" / defect.name, part / "mask")
    return part


# name: (model, extra arguments, what the error line says); "missing_mask" deletes mask 001 first
USER_ERRORS = {
    "wrong_backbone": ("FastFlow", ["--model.backbone", "resnet_nope"], "Unknown backbone='resnet_nope'"),
    "missing_data_folder": ("FastFlow", ["--data.root", "my_part_nope"], "Path does not exist"),
    "bad_input_size": ("CSFlow", ["--model.input_size", "[100, 100]"],
                       "input_size=(100, 100) is not valid for CS-Flow"),
    "missing_mask": ("FastFlow", [], "no mask for the defective image my_part/defect/001.png: expected "
                                     "my_part/mask/001_mask.png"),
}


@pytest.mark.parametrize("name", sorted(USER_ERRORS))
def test_user_mistakes_end_in_a_few_clear_lines(name: str, tmp_path: Path) -> None:
    """``anomalib train`` with a user mistake prints ``error: <what is wrong>`` and a hint, no traceback (exit 1)."""
    import os
    import subprocess
    import sys

    part = _readme_layout(tmp_path)
    if name == "missing_mask":
        (part / "mask" / "001_mask.png").unlink()
    model, extra, expected = USER_ERRORS[name]
    command = [str(Path(sys.executable).with_name("anomalib")), "train", "--model", f"flowad_plugins.{model}",
               "--model.backbone", "efficientnet_lite0", "--data", "anomalib.data.Folder", "--data.name", "my_part",
               "--data.root", "my_part", "--data.normal_dir", "good", "--data.abnormal_dir", "defect",
               "--data.mask_dir", "mask", "--data.num_workers", "0", *extra, "--trainer.max_epochs", "1",
               "--trainer.enable_progress_bar", "false", "--default_root_dir", "runs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWAD_VERBOSE": "0"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False, env=env)
    output = result.stdout + result.stderr
    lines = output.strip().splitlines()
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "│" not in output, output[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1 and expected in output, output[-3000:]
    assert lines[-1] == "(FLOWAD_VERBOSE=1 shows the full traceback)"
    assert len(lines) <= 25, output
