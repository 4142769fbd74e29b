"""Embedded offline data: ``SyntheticAD``, a generated dataset in anomalib's datamodule contract."""

from .datamodule import SyntheticAD
from .synthetic import CATEGORIES, SyntheticSpec, generate_dataset

__all__ = ["CATEGORIES", "SyntheticAD", "SyntheticSpec", "generate_dataset"]
