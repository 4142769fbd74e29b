"""Frozen timm feature extractors and where their weights come from.

``FeatureExtractor`` (``extractor``) turns a timm model name and layer names (``"layer2"``, ``"blocks.4"``, …, as
timm's ``feature_info`` names them) into a frozen module mapping images ``B×3×H×W`` to feature maps
``B×C_l×H/r_l×W/r_l``. ``weights``: weight sources (never a silent random fallback) and the input normalisation
each was trained with. ``batch_norm_folding``, ``feature_cache``: speed-ups.
"""

from .batch_norm_folding import fold_batch_norms
from .extractor import FeatureExtractor
from .weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneWeightsError,
    backbone_input_normalization,
    load_backbone_weights,
    offline_weights_file,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "BackboneWeightsError", "FeatureExtractor", "backbone_input_normalization",
    "fold_batch_norms", "load_backbone_weights", "offline_weights_file",
]
