"""``PredictFolder``: images of a folder for ``anomalib predict``, skipping unreadable files instead of aborting.

anomalib's ``PredictDataset`` raises on the first truncated or empty image, without the file name. ``PredictFolder``
warns naming each unreadable file, goes on, and reports the skipped files at the end of the pass::

    anomalib predict --model flowad_plugins.CflowAD --ckpt_path model.ckpt \\
        --data flowad_plugins.data.PredictFolder --data.path images/
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.data.utils import get_image_filenames, read_image
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import Transform

logger = logging.getLogger(__name__)

# What PIL raises on a truncated, empty, corrupt or oversized file.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_image_or_reason(path: str | Path) -> tuple[torch.Tensor | None, str | None]:
    """``(image 3×H×W float in [0, 1], None)``, or ``(None, reason)`` when the file cannot be decoded."""
    try:
        return read_image(path, as_tensor=True), None
    except UNREADABLE_IMAGE_ERRORS as error:
        return None, f"{type(error).__name__}: {error}"


def skipped_files_text(skipped: list[dict[str, str]], total: int) -> str:
    """One line naming the skipped files and why (``[{"path": …, "reason": …}]``) out of ``total``."""
    listed = "; ".join(f"{item['path']} ({item['reason']})" for item in skipped)
    return f"skipped {len(skipped)} of {total} images that could not be read: {listed}"


class PredictFolder(IterableDataset):
    """The images of ``path`` (a folder, or one image) as ``ImageItem``s; unreadable files are skipped and reported.

    Args:
        path: folder of images (the suffixes anomalib reads) or a single image file.
        transform: optional transform of each image ``3×H×W`` (the model's pre-processor resizes anyway).

    After a pass, ``skipped`` lists ``{"path", "reason"}`` of the files this process left out.
    """

    def __init__(self, path: str | Path, transform: Transform | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.exists():
            msg = f"path={str(self.path)!r} does not exist; pass a folder of images or one image file."
            raise FileNotFoundError(msg)
        self.image_filenames = sorted(get_image_filenames(self.path))
        self.transform = transform
        self.skipped: list[dict[str, str]] = []

    def __len__(self) -> int:
        """Number of image files found (an upper bound on the items yielded)."""
        return len(self.image_filenames)

    def __iter__(self) -> Iterator[ImageItem]:
        """Yield the readable images in file-name order (this worker's share with ``num_workers > 0``)."""
        worker = get_worker_info()
        paths = self.image_filenames if worker is None else self.image_filenames[worker.id :: worker.num_workers]
        self.skipped = []
        for path in paths:
            image, reason = read_image_or_reason(path)
            if image is None:
                logger.warning("PredictFolder: skipping %s, which cannot be read (%s).", path, reason)
                self.skipped.append({"path": str(path), "reason": str(reason)})
                continue
            yield ImageItem(image=self.transform(image) if self.transform else image, image_path=str(path))
        if self.skipped:
            logger.warning("PredictFolder: %s", skipped_files_text(self.skipped, len(paths)))

    @property
    def collate_fn(self) -> Callable:
        """``ImageBatch.collate`` (what ``anomalib predict`` wraps the dataset's loader with)."""
        return ImageBatch.collate
