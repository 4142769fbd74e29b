"""Offline data: ``SyntheticAD`` (a generated dataset in anomalib's datamodule contract) and ``PredictFolder``
(images of a folder for ``anomalib predict``, skipping unreadable files)."""

from .datamodule import SyntheticAD
from .predict_folder import PredictFolder
from .synthetic import CATEGORIES, SyntheticSpec, generate_dataset

__all__ = ["CATEGORIES", "PredictFolder", "SyntheticAD", "SyntheticSpec", "generate_dataset"]
