"""anomalib's Cflow, Fastflow and Csflow, built explicitly on any timm backbone with our offline weights.

anomalib's extractors would download ImageNet weights (impossible offline), so each model is built without them and
then gets the same weights our models use (``real_weights``), or keeps random ones (speed only). Where anomalib
hard-codes its backbone, its own modules are assembled around ours instead, nothing in anomalib is patched:

- Fastflow accepts four backbone names: for another timm CNN it is built on resnet18 (random, no download), then its
  extractor (``features_only``, stages 1–3, as anomalib calls timm), LayerNorms and flow blocks
  (``create_fast_flow_block``) are rebuilt for that backbone's channels and strides.
- Csflow always builds torchvision's EfficientNet-B5 with downloaded weights and a 304-channel flow: here its
  ``CsFlowModel`` (forward, scores, ``AnomalyMapGenerator``), cross-scale extractor (``forward`` with three input
  scales) and coupling layers (``ParallelPermute``, ``ParallelGlowCouplingLayer``) take the backbone truncated after
  ``layer`` (EfficientNet ``blocks.N``) and that layer's channel count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ANOMALIB_FASTFLOW_BACKBONES = ("resnet18", "wide_resnet50_2", "cait_m48_448", "deit_base_distilled_patch16_384")
CSFLOW_FEATURE_KEY = "features.6.8"  # the key anomalib's Csflow reads from its extractor's output
CSFLOW_DEFAULT_LAYER = "blocks.5"  # the last stride-32 block before the head, as anomalib's EfficientNet-B5 layer
ANOMALIB_MODELS = ("Cflow", "Fastflow", "Csflow")


class KeyedFeatures(nn.Module):
    """``images B×3×H×W -> {key: trunk(images)}``: a truncated backbone in place of anomalib's Csflow extractor."""

    def __init__(self, trunk: nn.Module, key: str) -> None:
        super().__init__()
        self.trunk, self.key = trunk, key

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key: self.trunk(images)}


def efficientnet_trunk(backbone: str, layer: str, real_weights: bool, backbone_weights: Any = None) -> nn.Module:
    """The timm EfficientNet ``backbone`` up to and including ``layer`` (``blocks.N``), frozen, in eval mode."""
    import timm

    from flowad_plugins.backbones import load_backbone_weights

    full = timm.create_model(backbone, pretrained=False)
    blocks = getattr(full, "blocks", None)
    index = layer.removeprefix("blocks.")
    if blocks is None or not layer.startswith("blocks.") or not index.isdigit() or int(index) >= len(blocks):
        allowed = [f"blocks.{i}" for i in range(len(blocks))] if blocks is not None else []
        msg = f"anomalib.Csflow here needs an EfficientNet-style backbone and layer; got layer={layer!r} of " \
              f"backbone={backbone!r}; allowed layers: {allowed}."
        raise ValueError(msg)
    if real_weights:
        load_backbone_weights(full, backbone, backbone_weights=backbone_weights)
    trunk = nn.Sequential(full.conv_stem, full.bn1, *full.blocks[: int(index) + 1])
    return trunk.eval().requires_grad_(False)


def _csflow_graph(channels: int, feature_sizes: list[tuple[int, int]], coupling_blocks: int, clamp: float,
                  hidden_channels: int) -> nn.Module:
    """anomalib's cross-scale flow (permute + parallel Glow coupling per block) for ``channels``-channel features."""
    from anomalib.models.image.csflow.torch_model import ParallelGlowCouplingLayer, ParallelPermute
    from FrEIA.framework import GraphINN, InputNode, Node, OutputNode

    kernel_sizes = [3] * (coupling_blocks - 1) + [5]
    names = ["input", "input2", "input3"]
    inputs = [InputNode(channels, height, width, name=name) for name, (height, width) in zip(names, feature_sizes,
                                                                                             strict=True)]
    nodes: list[Any] = [*inputs]
    previous = [node.out0 for node in inputs]
    for block in range(coupling_blocks):
        permute = Node(previous, ParallelPermute, {"seed": block}, name=f"permute_{block}")
        coupling = Node([permute.out0, permute.out1, permute.out2], ParallelGlowCouplingLayer,
                        {"clamp": clamp, "subnet_args": {"channels_hidden": hidden_channels,
                                                         "kernel_size": kernel_sizes[block]}},
                        name=f"fc1_{block}")
        nodes += [permute, coupling]
        previous = [coupling.out0, coupling.out1, coupling.out2]
    nodes += [OutputNode([output], name=f"output_end{index}") for index, output in enumerate(previous)]
    return GraphINN(nodes)


def _csflow_torch_model(image_size: int, trunk: nn.Module, cross_conv_hidden_channels: int, coupling_blocks: int,
                        clamp: float) -> nn.Module:
    """anomalib's ``CsFlowModel`` (its forward and scoring) around ``trunk`` at three input scales."""
    from anomalib.models.image.csflow.anomaly_map import AnomalyMapGenerator, AnomalyMapMode
    from anomalib.models.image.csflow.torch_model import (
        CrossScaleFlow,
        CsFlowModel,
        CsFlowMultiScaleFeatureExtractor,
    )

    input_size = (image_size, image_size)
    with torch.no_grad():
        probes = [trunk(torch.zeros(1, 3, image_size // 2**scale, image_size // 2**scale)) for scale in range(3)]
    channels = probes[0].shape[1]
    extractor = CsFlowMultiScaleFeatureExtractor.__new__(CsFlowMultiScaleFeatureExtractor)
    nn.Module.__init__(extractor)
    extractor.n_scales, extractor.input_size = 3, input_size
    extractor.feature_extractor = KeyedFeatures(trunk, CSFLOW_FEATURE_KEY)
    flow = CrossScaleFlow.__new__(CrossScaleFlow)
    nn.Module.__init__(flow)
    flow.input_dims, flow.n_coupling_blocks, flow.clamp = (3, *input_size), coupling_blocks, clamp
    flow.kernel_sizes = [3] * (coupling_blocks - 1) + [5]
    flow.cross_conv_hidden_channels = cross_conv_hidden_channels
    flow.graph = _csflow_graph(channels, [tuple(probe.shape[-2:]) for probe in probes], coupling_blocks, clamp,
                               cross_conv_hidden_channels)
    model = CsFlowModel.__new__(CsFlowModel)
    nn.Module.__init__(model)
    model.input_dims, model.clamp = (3, *input_size), clamp
    model.cross_conv_hidden_channels = cross_conv_hidden_channels
    model.feature_extractor = extractor.eval()
    model.graph = flow
    model.anomaly_map_generator = AnomalyMapGenerator(input_dims=model.input_dims, mode=AnomalyMapMode.ALL)
    return model


def _csflow(image_size: int, init: dict[str, Any], modules: dict[str, Any], real_weights: bool, weights: Any,
            backbone: str) -> Any:
    from anomalib.models import Csflow
    from anomalib.models.components import AnomalibModule
    from anomalib.models.image.csflow.loss import CsFlowLoss

    settings = {"cross_conv_hidden_channels": 1024, "n_coupling_blocks": 4, "clamp": 3, **init}
    layer = settings.pop("layer", CSFLOW_DEFAULT_LAYER)
    unknown = set(settings) - {"cross_conv_hidden_channels", "n_coupling_blocks", "clamp"}
    if unknown:
        msg = f"Unknown anomalib.Csflow init {sorted(unknown)}; allowed: backbone, backbone_weights, layer, " \
              "cross_conv_hidden_channels, n_coupling_blocks, clamp."
        raise ValueError(msg)
    trunk = efficientnet_trunk(backbone, layer, real_weights, weights)
    model = Csflow.__new__(Csflow)  # Csflow.__init__ would download EfficientNet-B5: the same fields, set here
    AnomalibModule.__init__(model, **modules)
    model.cross_conv_hidden_channels = settings["cross_conv_hidden_channels"]
    model.n_coupling_blocks, model.clamp, model.num_channels = settings["n_coupling_blocks"], settings["clamp"], 3
    model.model = _csflow_torch_model(image_size, trunk, model.cross_conv_hidden_channels, model.n_coupling_blocks,
                                      model.clamp)
    model.loss = CsFlowLoss()
    return model


def _fastflow(image_size: int, init: dict[str, Any], modules: dict[str, Any], real_weights: bool, weights: Any,
              backbone: str) -> Any:
    from anomalib.models import Fastflow
    from anomalib.models.image.fastflow.torch_model import create_fast_flow_block

    from flowad_plugins.backbones import load_backbone_weights

    native = backbone in ANOMALIB_FASTFLOW_BACKBONES
    model = Fastflow(backbone=backbone if native else "resnet18", pre_trained=False, **init, **modules)
    torch_model = model.model
    if not native:
        import timm

        torch_model.feature_extractor = timm.create_model(backbone, pretrained=False, features_only=True,
                                                          out_indices=[1, 2, 3]).requires_grad_(False)
        channels = torch_model.feature_extractor.feature_info.channels()
        scales = torch_model.feature_extractor.feature_info.reduction()
        dims = [[channel, image_size // scale, image_size // scale] for channel, scale in zip(channels, scales,
                                                                                              strict=True)]
        torch_model.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=True) for dim in dims)
        torch_model.fast_flow_blocks = nn.ModuleList(
            create_fast_flow_block(dim, model.conv3x3_only, model.hidden_ratio, model.flow_steps) for dim in dims)
    if real_weights:
        load_backbone_weights(torch_model.feature_extractor, backbone, backbone_weights=weights)
    return model


def _cflow(image_size: int, init: dict[str, Any], modules: dict[str, Any], real_weights: bool, weights: Any,
           backbone: str) -> Any:
    from anomalib.models import Cflow

    from flowad_plugins.backbones import load_backbone_weights

    del image_size
    model = Cflow(backbone=backbone, pre_trained=False, **init, **modules)
    if real_weights:
        load_backbone_weights(model.model.encoder.feature_extractor, backbone, backbone_weights=weights)
    return model


def build_anomalib_model(name: str, init: dict[str, Any], image_size: int, real_weights: bool,
                         keep_post_processor: bool = False) -> Any:
    """anomalib's ``name`` (Cflow, Fastflow, Csflow) on ``init["backbone"]`` for ``image_size``² inputs.

    It gets our evaluator (AUPRO, ``val_*``) and, unless ``keep_post_processor``, our rank-preserving
    ``FlowPostProcessor``: anomalib's default clamps normalised scores to [0, 1] with the validation range, which
    creates ties and biases AUROC/AUPRO down. Its pre-processor normalises with the mean/std of the weights used
    (ours convert inside the extractor; anomalib's don't). ``real_weights=False``: random backbone weights.
    """
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from flowad_plugins.backbones import backbone_input_normalization
    from flowad_plugins.models.common import FlowAnomalibModule
    from flowad_plugins.post_processing import FlowPostProcessor

    builders = {"Cflow": _cflow, "Fastflow": _fastflow, "Csflow": _csflow}
    if name not in builders:
        msg = f"Unknown anomalib model name={name!r}; allowed: {list(builders)}."
        raise ValueError(msg)
    init = dict(init)
    if "backbone" not in init:
        msg = f"anomalib.{name} needs init['backbone'] (a timm model name, e.g. 'efficientnet_lite0')."
        raise ValueError(msg)
    backbone, weights = init.pop("backbone"), init.pop("backbone_weights", None)
    norm = backbone_input_normalization(backbone, real_weights, weights)
    modules: dict[str, Any] = {
        "evaluator": FlowAnomalibModule.configure_evaluator(),
        "pre_processor": PreProcessor(transform=Compose([Resize((image_size, image_size), antialias=True),
                                                         Normalize(mean=list(norm.mean), std=list(norm.std))])),
    }
    if not keep_post_processor:
        modules["post_processor"] = FlowPostProcessor()
    return builders[name](image_size, init, modules, real_weights, weights, backbone)
