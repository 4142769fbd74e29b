"""``FeatureCache``: a frozen backbone's feature maps of the training images, computed once per fit.

The backbone never changes during training, so its features of the same image never change either. The cache keys
each image by a digest of its values (not its file name): an image changed by a random augmentation gets fresh
features, so the cache can only skip work. Entries stop being added once ``max_bytes`` is used. ``FeatureExtractor``
uses it only inside ``active()`` (training steps of a fit); validation, test, prediction and export never see it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# 4 GiB: the training set of CS-Flow's 640-px default takes about 1.4 MB per image
DEFAULT_MAX_BYTES = 4 << 30


class FeatureCache:
    """Per-image feature maps of a frozen extractor, keyed by the image's values, kept on the CPU.

    Shapes: ``features(images: B×3×H×W, extract) -> [B×C_l×h_l×w_l]``, where ``extract`` maps a batch of images
    to that list (the uncached forward pass).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.enabled = False
        self.hits = 0
        self.misses = 0
        self._entries: dict[bytes, list[torch.Tensor]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        """Bytes held by the cached feature maps."""
        return self._bytes

    @contextmanager
    def active(self) -> Iterator[FeatureCache]:
        """Use the cache for the extractor's calls inside this block (re-entrant)."""
        was_enabled, self.enabled = self.enabled, True
        try:
            yield self
        finally:
            self.enabled = was_enabled

    def clear(self) -> None:
        """Drop every entry (the end of a fit, or a backbone whose weights changed)."""
        self._entries.clear()
        self._bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        """Digest of one image ``3×H×W``: its shape, dtype and values."""
        values = image.detach().to("cpu").contiguous()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{tuple(values.shape)}{values.dtype}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
        return digest.digest()

    def features(self, images: torch.Tensor, extract: Callable[[torch.Tensor], list[torch.Tensor]]
                 ) -> list[torch.Tensor]:
        """``extract(images)``, with the cached images' maps taken from the cache and only the others computed."""
        keys = [self.key(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        computed: dict[int, list[torch.Tensor]] = {}
        if missing:
            fresh = extract(images[missing] if len(missing) < len(keys) else images)
            for row, index in enumerate(missing):
                maps = [level[row] for level in fresh]
                computed[index] = maps
                self._store(keys[index], maps)
        device = images.device
        per_image = [computed[i] if i in computed else self._entries[keys[i]] for i in range(len(keys))]
        return [torch.stack([maps[level].to(device) for maps in per_image]).contiguous(
                    memory_format=torch.channels_last) for level in range(len(per_image[0]))]

    def _store(self, key: bytes, maps: list[torch.Tensor]) -> None:
        size = sum(m.numel() * m.element_size() for m in maps)
        if self._bytes + size > self.max_bytes:
            return
        self._entries[key] = [m.detach().to("cpu", copy=True) for m in maps]
        self._bytes += size
