"""Validation on the latest normal images (``flowad_plugins.data.hold_out_latest`` / ``LatestFolder``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flowad_plugins.data import LatestFolder, SyntheticAD, hold_out_latest

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")


def _names(paths) -> list[str]:
    return sorted(Path(path).name for path in paths)


def test_synthetic_validation_holds_out_the_last_normal_images_and_keeps_its_anomalies(synthetic_root) -> None:
    data = hold_out_latest(SyntheticAD)(root=synthetic_root, category="surface", image_size=128, num_train=16,
                                        num_test_good=4, num_test_per_defect=3, val_split_mode="synthetic",
                                        val_split_ratio=0.25, seed=0)
    data.setup("fit")
    names = _names((synthetic_root / "surface" / "train" / "good").glob("*.png"))
    assert _names(data.val_data.source_samples.image_path) == names[-4:]
    assert _names(data.train_data.samples.image_path) == names[:-4]
    assert set(data.val_data.samples.label_index.tolist()) == {0, 1}, "synthetic anomalies are still added"


def test_latest_folder_validates_on_its_latest_normal_images_from_the_cli_name(synthetic_root) -> None:
    """``--data flowad_plugins.data.LatestFolder`` resolves, and ``from_train`` holds out the latest normal images."""
    from anomalib.data import AnomalibDataModule
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    config = parser.parse_args(["--data", "flowad_plugins.data.LatestFolder", "--data.name", "surface",
                                "--data.root", str(synthetic_root / "surface"), "--data.normal_dir", "train/good",
                                "--data.abnormal_dir", "test/scratch", "--data.normal_test_dir", "test/good",
                                "--data.val_split_mode", "from_train",
                                "--data.val_split_ratio", "0.25"])
    data = parser.instantiate_classes(config).data
    assert type(data) is LatestFolder
    data.setup("fit")
    names = _names((synthetic_root / "surface" / "train" / "good").glob("*.png"))
    assert _names(data.val_data.samples.image_path) == names[-4:]
    assert set(data.val_data.samples.label_index.tolist()) == {0}
    assert _names(data.train_data.samples.image_path) == names[:-4]


def test_a_ratio_that_leaves_nothing_to_train_on_is_named(synthetic_root) -> None:
    data = LatestFolder(name="surface", root=synthetic_root / "surface", normal_dir="train/good",
                        val_split_mode="from_train", val_split_ratio=0.99)
    with pytest.raises(ValueError, match=r"val_split_ratio 0.99 leaves no normal image to train on"):
        data.setup("fit")


def test_the_benchmark_split_names_its_allowed_values() -> None:
    if BENCHMARKS not in sys.path:
        sys.path.append(BENCHMARKS)
    from harness.datasets import validation_split_datamodule

    with pytest.raises(ValueError, match=r"held_out must be one of \['random', 'last'\], got 'first'"):
        validation_split_datamodule("generated", 8, held_out="first")
