"""The one model registry of ``benchmarks/``: our three plugins and anomalib's Cflow/Fastflow/Csflow.

``build_model(name, init, image_size)`` builds our class ``name`` or ``anomalib.<Name>`` (``anomalib_models``) with
any settings (``evaluate.py``). ``MODEL_SPECS`` names the benchmarked pairs, each side with the same backbone, layers
and input size (the shipped ``configs/*_efficientnet_lite0.yaml`` settings):

- ``cflow``: efficientnet_lite0 ``[blocks.2, blocks.4]``, 8 coupling blocks, condition 128, clamp 1.9.
- ``fastflow``: efficientnet_lite0 ``[blocks.1, blocks.2, blocks.4]`` (anomalib: timm stages 1–3, the same blocks),
  8 flow steps, 3×3 + 1×1 subnets, hidden ratio 1.0.
- ``csflow``: efficientnet_lite0 ``blocks.4`` (112 channels), 3 scales, 4 coupling blocks, subnet width 112, clamp 3.

Weights do not change the work done, so for speed every model may be built with random weights
(``real_weights=False``); with ``real_weights=True`` (accuracy) efficientnet_lite0 gets the offline ImageNet weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anomalib.models.components import AnomalibModule

LITE0 = "efficientnet_lite0"
CFLOW_OURS = {"backbone": LITE0, "layers": ["blocks.2", "blocks.4"], "coupling_blocks": 8, "clamp_alpha": 1.9,
              "condition_dim": 128, "permute_soft": True}
CFLOW_ANOMALIB = {"backbone": LITE0, "layers": ["blocks.2", "blocks.4"], "coupling_blocks": 8, "clamp_alpha": 1.9,
                  "condition_vector": 128, "permute_soft": False}
FASTFLOW_FLOW = {"flow_steps": 8, "conv3x3_only": False, "hidden_ratio": 1.0}
CSFLOW_OURS = {"backbone": LITE0, "layer": "blocks.4", "num_scales": 3, "coupling_blocks": 4, "hidden_channels": 112,
               "clamp_alpha": 3.0}
CSFLOW_ANOMALIB = {"backbone": LITE0, "layer": "blocks.4", "n_coupling_blocks": 4, "cross_conv_hidden_channels": 112,
                   "clamp": 3}


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: grid name, its pair, whose it is, the class and settings it is built with."""

    name: str
    family: str
    ours: bool
    model: str
    init: dict[str, Any] = field(default_factory=dict)
    settings: str = ""


MODEL_SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("CflowAD", "cflow", True, "CflowAD", CFLOW_OURS,
              "efficientnet_lite0 [blocks.2, blocks.4], 8 blocks, condition 128"),
    ModelSpec("anomalib.Cflow", "cflow", False, "anomalib.Cflow", CFLOW_ANOMALIB,
              "efficientnet_lite0 [blocks.2, blocks.4], 8 blocks, condition 128"),
    ModelSpec("FastFlow", "fastflow", True, "FastFlow",
              {"backbone": LITE0, "layers": ["blocks.1", "blocks.2", "blocks.4"], **FASTFLOW_FLOW},
              "efficientnet_lite0 [blocks.1, blocks.2, blocks.4], 8 steps, hidden ratio 1.0"),
    ModelSpec("anomalib.Fastflow", "fastflow", False, "anomalib.Fastflow", {"backbone": LITE0, **FASTFLOW_FLOW},
              "efficientnet_lite0 timm stages 1–3 (= blocks.1, .2, .4), 8 steps, hidden ratio 1.0"),
    ModelSpec("CSFlow", "csflow", True, "CSFlow", CSFLOW_OURS,
              "efficientnet_lite0 blocks.4 (112 ch), 3 scales, 4 blocks, width 112"),
    ModelSpec("anomalib.Csflow", "csflow", False, "anomalib.Csflow", CSFLOW_ANOMALIB,
              "efficientnet_lite0 blocks.4 (112 ch), 3 scales, 4 blocks, width 112"),
    # a tiny pair for the harness's own tests (not in the default grid)
    ModelSpec("CflowAD-tiny", "cflow-tiny", True, "CflowAD",
              {**CFLOW_OURS, "coupling_blocks": 2, "condition_dim": 16, "fiber_batch_size": 64, "permute_soft": False},
              "efficientnet_lite0 [blocks.2, blocks.4], 2 blocks, condition 16"),
    ModelSpec("anomalib.Cflow-tiny", "cflow-tiny", False, "anomalib.Cflow",
              {**CFLOW_ANOMALIB, "coupling_blocks": 2, "condition_vector": 16},
              "efficientnet_lite0 [blocks.2, blocks.4], 2 blocks, condition 16"),
)}
FAMILIES = ("cflow", "fastflow", "csflow", "cflow-tiny")
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
# our classes and their shipped (offline) configs: what the accuracy table, exports and analyses run
SHIPPED_CONFIGS = {"CflowAD": "cflow_ad_efficientnet_lite0.yaml", "FastFlow": "fastflow_efficientnet_lite0.yaml",
                   "CSFlow": "csflow_efficientnet_lite0.yaml"}
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


def build_model(name: str, init: dict[str, Any] | None = None, image_size: int = 256, real_weights: bool = True,
                keep_anomalib_post_processor: bool = False) -> AnomalibModule:
    """Our class ``name`` or anomalib's ``anomalib.<Name>`` with ``init``, for ``image_size``² B×3×H×W inputs.

    ``real_weights``: offline ImageNet backbone weights (our models' ``pre_trained`` unless ``init`` sets it);
    ``False`` builds random backbones (speed only).
    """
    init = dict(init or {})
    if name.startswith("anomalib."):
        from harness.anomalib_models import build_anomalib_model

        return build_anomalib_model(name.removeprefix("anomalib."), init, image_size, real_weights,
                                    keep_anomalib_post_processor)
    import flowad_plugins

    allowed = ["CflowAD", "FastFlow", "CSFlow"]
    if name not in allowed:
        msg = f"Unknown model name={name!r}; allowed: {allowed} or anomalib.<Name> (Cflow, Fastflow, Csflow)."
        raise ValueError(msg)
    model_class = getattr(flowad_plugins, name)
    init.setdefault("pre_trained", real_weights)
    return model_class(**init, pre_processor=model_class.configure_pre_processor((image_size, image_size)))


def _check_ours(name: str) -> None:
    if name not in SHIPPED_CONFIGS:
        msg = f"Unknown model name={name!r}; allowed: {list(SHIPPED_CONFIGS)}."
        raise ValueError(msg)


def shipped_config(name: str) -> dict[str, Any]:
    """The parsed ``configs/<name>_efficientnet_lite0.yaml`` of our class ``name`` (CflowAD, FastFlow or CSFlow)."""
    import yaml

    _check_ours(name)
    return yaml.safe_load((CONFIGS_DIR / SHIPPED_CONFIGS[name]).read_text())


def shipped_init(name: str) -> dict[str, Any]:
    """The model ``init_args`` of our class ``name``'s shipped config (``seed`` left out: it seeds the run)."""
    return {key: value for key, value in shipped_config(name)["model"]["init_args"].items() if key != "seed"}


def load_checkpoint(name: str, path: str | Path, weights_only: bool = True) -> AnomalibModule:
    """Our class ``name`` loaded from a Lightning checkpoint on the CPU, in eval mode."""
    import flowad_plugins

    _check_ours(name)
    model_class = getattr(flowad_plugins, name)
    return model_class.load_from_checkpoint(path, map_location="cpu", weights_only=weights_only).eval()


def default_input_side(name: str) -> int:
    """The square input side a model is built for by default: our class's ``DEFAULT_INPUT_SIZE``, else 256."""
    if name.startswith("anomalib."):
        return 256
    import flowad_plugins

    return int(getattr(flowad_plugins, name).DEFAULT_INPUT_SIZE[0])


def build_benchmark_model(name: str, image_size: int = 256, real_weights: bool = False) -> AnomalibModule:
    """The Lightning module of benchmark model ``name`` (a ``MODEL_SPECS`` key) for ``image_size``² inputs."""
    check_model_names([name])
    spec = MODEL_SPECS[name]
    return build_model(spec.model, spec.init, image_size, real_weights)


def build_pair(family: str, image_size: int = 256, real_weights: bool = False) -> tuple[dict[str, str], Any, Any]:
    """(settings, ours, anomalib's) Lightning modules of one family, in eval mode."""
    ours, theirs = pair_of(family)
    settings = {"ours": f"{ours.name}: {ours.settings}", "anomalib": f"{theirs.name}: {theirs.settings}"}
    return (settings, build_benchmark_model(ours.name, image_size, real_weights).eval(),
            build_benchmark_model(theirs.name, image_size, real_weights).eval())


def backbone_of(model: Any) -> Any:
    """``images B×3×H×W in [0, 1] -> backbone features``: a model's pre-processing and its frozen backbone alone.

    The same work as inside the model: our CSFlow's and anomalib's Csflow's extractors run at all three scales.
    """
    import torch

    torch_model = model.model
    extractor = getattr(torch_model, "features", None)  # our CSFlow: the encoder at every scale
    if extractor is None:
        extractor = getattr(torch_model, "encoder", None) or getattr(torch_model, "feature_extractor", None)
    if extractor is None:
        msg = f"No backbone found in {type(torch_model).__name__} (looked for features, encoder, feature_extractor)."
        raise ValueError(msg)

    class BackboneOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre_processor, self.torch_model = model.pre_processor, torch_model

        def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
            features = extractor(self.pre_processor(images))
            features = list(features.values()) if isinstance(features, dict) else features
            return list(features) if isinstance(features, list | tuple) else [features]

    return BackboneOnly().eval()


def parameter_count(model: Any) -> int:
    """Number of parameters of a torch module (backbone included)."""
    return sum(parameter.numel() for parameter in model.parameters())
