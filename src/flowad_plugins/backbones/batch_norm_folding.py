"""Folding frozen batch-norms into the convolutions before them (one pass less over every activation)."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("flowad_plugins.backbones")


def folded_conv_parameters(
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
    """Fold every eval-mode batch-norm that directly follows a ``Conv2d`` into that conv, in place; returns the
    folded ``(conv name, batch-norm name, eps)``.

    Pairs are found by running ``model`` on a random ``1×3×H×W`` input (no architecture hard-coded); timm's
    ``BatchNormAct2d`` keeps its dropout/activation. If any output then differs by more than ``tolerance``
    (relative), everything is restored and nothing is folded.
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
        weight, bias = folded_conv_parameters(conv.weight.data, conv.bias, norm_tensors, norm.eps)
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
