"""The normal validation images' predictions, gathered across DDP ranks, and their file paths."""

from __future__ import annotations

from typing import Any

import torch
from anomalib.data import Batch
from torchmetrics import Metric


class NormalValidationPredictions(Metric):
    """Scores ``(n,)`` and flattened maps ``(n, H·W)`` of the normal validation images; count of anomalous ones.

    A torchmetrics ``Metric`` so that ``compute`` gathers the states across DDP ranks.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("anomalous", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, batch: Batch) -> None:  # type: ignore[override]
        """Keep the normal images of ``batch`` (``gt_label == 0``); all are normal when labels are missing."""
        labels = batch.gt_label
        score = batch.pred_score
        anomaly_map = batch.anomaly_map
        if score is None and anomaly_map is not None:
            score = anomaly_map.flatten(1).amax(dim=1)
        if score is None:
            return
        normal = torch.ones(len(score), dtype=torch.bool, device=score.device)
        if labels is not None:
            normal = labels.flatten().to(score.device) == 0
            self.anomalous += int((~normal).sum())
        self.scores.append(score.detach().flatten()[normal].float())
        if anomaly_map is not None:
            self.maps.append(anomaly_map.detach()[normal].flatten(1).float())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(normal scores ``(n,)``, normal maps ``(n, P)`` or ``None``, number of anomalous images)."""
        scores = torch.cat(self.scores) if isinstance(self.scores, list) else self.scores
        maps = self.maps
        if isinstance(maps, list):
            maps = torch.cat(maps) if maps else None
        return scores, maps, int(self.anomalous)


def normal_sample_paths(dataset: Any) -> tuple[list[str] | None, list[str]]:
    """(all image paths, normal image paths) of an anomalib dataset, or ``(None, [])`` when unknown."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return None, []
    paths = [str(path) for path in samples["image_path"]]
    if "label_index" in samples.columns:
        normal = [str(path) for path, label in zip(samples["image_path"], samples["label_index"], strict=True)
                  if int(label) == 0]
    else:
        normal = paths
    return paths, normal
