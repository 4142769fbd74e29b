"""Offline data: ``SyntheticAD`` (a generated dataset in anomalib's datamodule contract), ``PredictFolder``
(images of a folder for ``anomalib predict``, skipping unreadable files) and ``LatestFolder`` / ``hold_out_latest``
(validation on the latest normal images instead of a random share)."""

from .datamodule import SyntheticAD
from .latest_split import LatestFolder, hold_out_latest
from .predict_folder import PredictFolder
from .synthetic import SyntheticSpec, generate_dataset

__all__ = ["LatestFolder", "PredictFolder", "SyntheticAD", "SyntheticSpec", "generate_dataset", "hold_out_latest"]
