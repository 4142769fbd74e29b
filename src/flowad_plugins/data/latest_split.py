"""Validation on the *latest* normal images: ``hold_out_latest`` and ``LatestFolder``.

anomalib's validation splits take a random share of the normal training images, from the same capture sessions as
the training images, so they cannot show what another day brings (a darker background, another lamp): measured on
MVTec 3D-AD tire (``docs/results.md``). Image files are usually numbered in capture order; ``hold_out_latest(cls)``
subclasses an anomalib image datamodule so that ``val_split_mode`` ``from_train`` and ``synthetic`` hold out the
*last* ``val_split_ratio`` of the normal training images in file-name order (other modes are unchanged).
"""

from __future__ import annotations

from functools import cache

from anomalib.data import Folder
from anomalib.data.utils import ValSplitMode
from anomalib.data.utils.synthetic import SyntheticAnomalyDataset


@cache
def hold_out_latest(datamodule_class: type) -> type:
    """``datamodule_class`` with validation held out from the latest normal training images (see the module)."""

    class HoldOutLatest(datamodule_class):
        __doc__ = f"{datamodule_class.__name__} validated on its latest normal training images (file-name order)."

        def _create_val_split(self) -> None:
            mode = ValSplitMode(self.val_split_mode)
            if mode not in {ValSplitMode.FROM_TRAIN, ValSplitMode.SYNTHETIC}:
                super()._create_val_split()
                return
            samples = self.train_data.samples
            normal = samples.index[samples["label_index"] == 0] if "label_index" in samples else samples.index
            order = samples.loc[normal, "image_path"].astype(str).sort_values(kind="stable").index
            count = max(1, round(len(order) * self.val_split_ratio))
            if count >= len(order):
                msg = (f"val_split_ratio {self.val_split_ratio} leaves no normal image to train on "
                       f"({len(order)} normal training images).")
                raise ValueError(msg)
            held_out = samples.index.get_indexer(order)[-count:].tolist()
            held_out_set = set(held_out)
            kept = [position for position in range(len(samples)) if position not in held_out_set]
            latest = self.train_data.subsample(held_out)
            self.train_data = self.train_data.subsample(kept)
            self.val_data = SyntheticAnomalyDataset.from_dataset(latest) if mode == ValSplitMode.SYNTHETIC else latest

    HoldOutLatest.__name__ = HoldOutLatest.__qualname__ = f"Latest{datamodule_class.__name__}"
    HoldOutLatest.__module__ = __name__
    return HoldOutLatest


LatestFolder = hold_out_latest(Folder)
"""anomalib's ``Folder`` validated on its latest normal images: ``--data flowad_plugins.data.LatestFolder``."""
