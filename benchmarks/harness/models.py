"""The benchmark's models: our three plugins and anomalib's Cflow/Fastflow/Csflow, built side by side.

Each pair uses the same backbone, layers and flow size where anomalib allows it:

- ``cflow``: efficientnet_lite0 ``[blocks.2, blocks.4]``, 8 coupling blocks, condition 128, clamp 1.9.
- ``fastflow``: resnet18 ``layer1..3``, 8 flow steps of 3×3 subnets, hidden ratio 1.0 (anomalib's Fastflow
  accepts only resnet18, wide_resnet50_2, deit and cait).
- ``csflow``: each at its own defaults; anomalib's Csflow always uses torchvision EfficientNet-B5
  (``features.6.8``, subnet width 1024), ours efficientnet_lite0 ``blocks.4`` (width 112).

Weights do not change the work done, so for speed every model may be built with random weights
(``real_weights=False``); anomalib's backbones are then built without download. With ``real_weights=True``
(training for accuracy) the efficientnet_lite0 models get the offline ImageNet weights; models whose backbone
has no offline weights (resnet18, EfficientNet-B5) report so in ``ModelSpec.offline_weights`` and are not
evaluated for accuracy (random features say nothing about a detector).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalib.models.components import AnomalibModule

CFLOW_SETTINGS: dict[str, Any] = {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"],
                                  "coupling_blocks": 8, "clamp_alpha": 1.9}
FASTFLOW_SETTINGS: dict[str, Any] = {"backbone": "resnet18", "flow_steps": 8, "conv3x3_only": True,
                                     "hidden_ratio": 1.0}


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: grid name, the pair it belongs to, whose it is, and how it is set up."""

    name: str
    family: str
    ours: bool
    settings: str
    offline_weights: bool


MODEL_SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("CflowAD", "cflow", True, "efficientnet_lite0 [blocks.2, blocks.4], 8 blocks, condition 128", True),
    ModelSpec("anomalib.Cflow", "cflow", False, "efficientnet_lite0 [blocks.2, blocks.4], 8 blocks, condition 128",
              True),
    ModelSpec("FastFlow", "fastflow", True, "resnet18 layer1..3, 8 steps, 3×3 subnets, hidden ratio 1.0", False),
    ModelSpec("anomalib.Fastflow", "fastflow", False, "resnet18 layer1..3, 8 steps, 3×3 subnets, hidden ratio 1.0",
              False),
    ModelSpec("CSFlow", "csflow", True, "defaults: efficientnet_lite0 blocks.4 (112 ch), width 112, 4 blocks", True),
    ModelSpec("anomalib.Csflow", "csflow", False, "defaults: torchvision EfficientNet-B5 features.6.8, width 1024",
              False),
    # a tiny pair for the harness's own tests (not in the default grid)
    ModelSpec("CflowAD-tiny", "cflow-tiny", True, "efficientnet_lite0 [blocks.2, blocks.4], 2 blocks, condition 16",
              True),
    ModelSpec("anomalib.Cflow-tiny", "cflow-tiny", False,
              "efficientnet_lite0 [blocks.2, blocks.4], 2 blocks, condition 16", True),
)}
FAMILIES = ("cflow", "fastflow", "csflow", "cflow-tiny")
DEFAULT_MODELS = ["CflowAD", "anomalib.Cflow", "FastFlow", "anomalib.Fastflow", "CSFlow", "anomalib.Csflow"]


def check_model_names(names: list[str]) -> None:
    """Raise ``ValueError`` naming the allowed values when a model name is unknown."""
    unknown = [name for name in names if name not in MODEL_SPECS]
    if unknown:
        msg = f"Unknown models={unknown}; allowed: {list(MODEL_SPECS)}."
        raise ValueError(msg)


def pair_of(family: str) -> tuple[ModelSpec, ModelSpec]:
    """(ours, anomalib's) specs of a family (``cflow``, ``fastflow`` or ``csflow``)."""
    ours = [spec for spec in MODEL_SPECS.values() if spec.family == family and spec.ours]
    theirs = [spec for spec in MODEL_SPECS.values() if spec.family == family and not spec.ours]
    if not ours or not theirs:
        msg = f"Unknown family={family!r}; allowed: {list(FAMILIES)}."
        raise ValueError(msg)
    return ours[0], theirs[0]


def _pre_processor(image_size: int, normalization: tuple | None = None):
    """anomalib's resize + ImageNet normalisation, or ``normalization = (mean, std)`` instead."""
    from anomalib.models.components import AnomalibModule

    if normalization is None:
        return AnomalibModule.configure_pre_processor((image_size, image_size))
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    mean, std = normalization
    return PreProcessor(transform=Compose([Resize((image_size, image_size), antialias=True),
                                           Normalize(mean=list(mean), std=list(std))]))


def _fair_evaluation(init: dict[str, Any]) -> dict[str, Any]:
    """anomalib's models get our evaluator (AUPRO, ``val_*``) and rank-preserving post-processor, as in evaluate.py."""
    from flowad_plugins.models.common import FlowAnomalibModule
    from flowad_plugins.post_processing import FlowPostProcessor

    return {**init, "evaluator": FlowAnomalibModule.configure_evaluator(), "post_processor": FlowPostProcessor()}


def _build_cflow_ad(image_size: int, real_weights: bool) -> AnomalibModule:
    from flowad_plugins import CflowAD

    return CflowAD(**CFLOW_SETTINGS, condition_dim=128, permute_soft=True, pre_trained=real_weights,
                   pre_processor=_pre_processor(image_size))


def _build_cflow_ad_tiny(image_size: int, real_weights: bool) -> AnomalibModule:
    from flowad_plugins import CflowAD

    return CflowAD(**{**CFLOW_SETTINGS, "coupling_blocks": 2}, condition_dim=16, fiber_batch_size=64,
                   permute_soft=False, pre_trained=real_weights, pre_processor=_pre_processor(image_size))


def _build_anomalib_cflow(image_size: int, real_weights: bool, coupling_blocks: int = 8,
                          condition_vector: int = 128) -> AnomalibModule:
    from anomalib.models import Cflow

    from flowad_plugins.backbones import backbone_input_normalization, load_backbone_weights

    model = Cflow(**_fair_evaluation({}), **{**CFLOW_SETTINGS, "coupling_blocks": coupling_blocks},
                  condition_vector=condition_vector, permute_soft=False, pre_trained=False,
                  pre_processor=_pre_processor(image_size))
    if real_weights:  # anomalib's extractor would download: load the same offline weights ours use
        load_backbone_weights(model.model.encoder.feature_extractor, CFLOW_SETTINGS["backbone"])
        # and normalise its input as those weights expect (ours convert inside the extractor; anomalib's don't)
        model.pre_processor = _pre_processor(image_size, backbone_input_normalization(CFLOW_SETTINGS["backbone"]))
    return model


def _build_fastflow(image_size: int, real_weights: bool) -> AnomalibModule:
    from flowad_plugins import FastFlow

    del real_weights  # resnet18 has no offline weights: always random
    return FastFlow(**FASTFLOW_SETTINGS, layers=["layer1", "layer2", "layer3"], pre_trained=False,
                    pre_processor=_pre_processor(image_size))


def _build_anomalib_fastflow(image_size: int, real_weights: bool) -> AnomalibModule:
    from anomalib.models import Fastflow

    del real_weights
    return Fastflow(**_fair_evaluation({}), **FASTFLOW_SETTINGS, pre_trained=False,
                    pre_processor=_pre_processor(image_size))


def _build_csflow(image_size: int, real_weights: bool) -> AnomalibModule:
    from flowad_plugins import CSFlow

    return CSFlow(pre_trained=real_weights, pre_processor=_pre_processor(image_size))


def _build_anomalib_csflow(image_size: int, real_weights: bool) -> AnomalibModule:
    from unittest import mock

    import torchvision
    from anomalib.models import Csflow
    from anomalib.models.image.csflow import torch_model as anomalib_csflow

    del real_weights  # anomalib's Csflow always downloads EfficientNet-B5 weights: build it with random ones

    def random_b5(*_: Any, **kwargs: Any) -> torchvision.models.EfficientNet:
        kwargs.pop("weights", None)
        return torchvision.models.efficientnet_b5(weights=None, **kwargs)

    with mock.patch.object(anomalib_csflow, "efficientnet_b5", random_b5):
        return Csflow(**_fair_evaluation({}), pre_processor=_pre_processor(image_size))


BUILDERS: dict[str, Callable[[int, bool], AnomalibModule]] = {
    "CflowAD": _build_cflow_ad,
    "anomalib.Cflow": _build_anomalib_cflow,
    "FastFlow": _build_fastflow,
    "anomalib.Fastflow": _build_anomalib_fastflow,
    "CSFlow": _build_csflow,
    "anomalib.Csflow": _build_anomalib_csflow,
    "CflowAD-tiny": _build_cflow_ad_tiny,
    "anomalib.Cflow-tiny": lambda size, real: _build_anomalib_cflow(size, real, coupling_blocks=2, condition_vector=16),
}


def build_model(name: str, image_size: int = 256, real_weights: bool = False) -> AnomalibModule:
    """The Lightning module of benchmark model ``name`` for ``image_size``² inputs (B×3×H×W images in [0, 1]).

    ``real_weights``: load offline ImageNet backbone weights where they exist (needed for accuracy, not speed).
    """
    check_model_names([name])
    return BUILDERS[name](image_size, real_weights and MODEL_SPECS[name].offline_weights)


def build_pair(family: str, image_size: int = 256, real_weights: bool = False) -> tuple[dict[str, str], Any, Any]:
    """(settings, ours, anomalib's) Lightning modules of one family, in eval mode."""
    ours, theirs = pair_of(family)
    settings = {"ours": f"{ours.name}: {ours.settings}", "anomalib": f"{theirs.name}: {theirs.settings}"}
    return (settings, build_model(ours.name, image_size, real_weights).eval(),
            build_model(theirs.name, image_size, real_weights).eval())


def parameter_count(model: Any) -> int:
    """Number of parameters of a torch module (backbone included)."""
    return sum(parameter.numel() for parameter in model.parameters())
