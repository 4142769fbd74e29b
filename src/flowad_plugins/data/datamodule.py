"""``SyntheticAD``: anomalib's MVTec AD datamodule over data generated on first use (no download)."""

from __future__ import annotations

from pathlib import Path

from anomalib.data import MVTecAD
from anomalib.data.utils import ValSplitMode

from .synthetic import CATEGORIES, SyntheticSpec, generate_dataset


class SyntheticAD(MVTecAD):
    """Generated industrial dataset (``surface`` or ``object``) with exact defect masks.

    Works wherever ``anomalib.data.MVTecAD`` does (``--data flowad_plugins.data.SyntheticAD``).
    Validation defaults to 20 % of the normal training images plus synthetic anomalies made from
    them, so nothing is tuned on the test set.

    Args:
        root: folder the dataset is generated into (reused when its spec matches).
        category: ``"surface"`` or ``"object"``.
        image_size: side of the generated square images.
        num_train, num_test_good, num_test_per_defect: image counts.
        generator_seed: seed of the image generator (the split seed is ``seed``).
        Other arguments as ``anomalib.data.MVTecAD``.
    """

    def __init__(
        self,
        root: str | Path = "./datasets/flowad_synthetic",
        category: str = "surface",
        image_size: int = 256,
        num_train: int = 80,
        num_test_good: int = 12,
        num_test_per_defect: int = 8,
        generator_seed: int = 0,
        train_batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        val_split_mode: ValSplitMode | str = ValSplitMode.SYNTHETIC,
        val_split_ratio: float = 0.2,
        seed: int | None = 0,
        **kwargs,
    ) -> None:
        if category not in CATEGORIES:
            msg = f"Unknown category={category!r} for SyntheticAD; allowed: {sorted(CATEGORIES)}."
            raise ValueError(msg)
        self.spec = SyntheticSpec(
            category=category,
            image_size=image_size,
            num_train=num_train,
            num_test_good=num_test_good,
            num_test_per_defect=num_test_per_defect,
            seed=generator_seed,
        )
        super().__init__(
            root=root,
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
            **kwargs,
        )

    def prepare_data(self) -> None:
        """Generate the dataset if it is not already on disk with the same spec."""
        generate_dataset(self.root, self.spec)
