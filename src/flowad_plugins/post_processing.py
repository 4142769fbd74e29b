"""Post-processing for the flow models: anomalib's ``PostProcessor`` with rank-preserving normalisation.

anomalib normalises a score as ``clamp((x − t)/(max − min) + 0.5, 0, 1)`` with ``t``, ``min`` and
``max`` from the validation set. Every test score beyond the validation range becomes exactly 0 or 1,
so ties corrupt AUROC/AUPRO computed after post-processing, and the ranking of strong anomalies is lost.
``FlowPostProcessor`` keeps the threshold at 0.5 and the slope near it, but compresses the tails
smoothly (``0.5 + 0.5·v/(1+|v|)``, ``v = 2(x − t)/(max − min)``): strictly increasing, in (0, 1),
no ties in float32 short of ~10⁷ ranges away.
"""

from __future__ import annotations

import torch
from anomalib.post_processing import PostProcessor


class FlowPostProcessor(PostProcessor):
    """anomalib ``PostProcessor`` (same thresholds, buffers, export) with rank-preserving normalisation."""

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        """Map ``preds`` to (0, 1), ``threshold`` to 0.5, strictly increasing; unchanged without statistics."""
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        safe_range = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
        scaled = 2 * (preds - threshold) / safe_range
        normalized = 0.5 + 0.5 * scaled / (1 + scaled.abs())
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(has_range, normalized, preds)
