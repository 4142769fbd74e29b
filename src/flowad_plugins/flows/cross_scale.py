"""Cross-scale coupling flow of CS-Flow (Rudolph et al., WACV 2022), in plain torch with an explicit inverse.

The flow acts jointly on ``S`` feature maps of one image, ``x_l: B×C×h_l×w_l`` with ``h_{l+1} = ⌈h_l/2⌉``. Each
coupling block splits the channels into halves ``(a, b)`` at every scale and transforms them in turn::

    a_l ← a_l · exp(σ(s_l)) + t_l,   (s, t) = subnet_1(b_0 … b_{S-1})
    b_l ← b_l · exp(σ(s_l)) + t_l,   (s, t) = subnet_2(a_0 … a_{S-1})   (the updated a)

with the soft clamp ``σ(s) = (2α/π)·atan(s/α)``. A subnet (``CrossScaleSubnet``) sees all scales at once; its gain
starts at 0, so every block starts as the identity. A fixed seeded channel permutation precedes every block, and
optionally a data-initialised ``MultiScaleActNorm`` the first one. The log-determinant (per image ``B``) is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from flowad_plugins.flows.affine import affine_forward, affine_inverse, soft_clamp

__all__ = ["CrossScaleCoupling", "CrossScaleFlow", "CrossScaleSubnet", "MultiScaleActNorm", "soft_clamp"]


class CrossScaleSubnet(nn.Module):
    """Subnet mixing ``num_scales`` maps: ``[B×c_in×h_l×w_l] -> [B×c_out×h_l×w_l]``.

    Per scale ``l``: ``u_l = LeakyReLU(conv_in_l(x_l))`` (width ``hidden``), then ``out_l = γ_l·(conv_same_l(u_l) +
    conv_down(u_{l-1}, stride 2) + up(conv_up(u_{l+1})))``, the coarser scale convolved at its own resolution
    (cheaper), then upsampled bilinearly. ``γ`` starts at 0.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int, num_scales: int = 3
    ) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.num_scales = num_scales
        self.conv_in = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding) for _ in range(num_scales)
        )
        self.conv_same = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=padding) for _ in range(num_scales)
        )
        # conv_down[l]: scale l -> l+1 (stride 2); conv_up[l]: scale l+1 -> l (then bilinear upsampling)
        self.conv_down = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, stride=2, padding=padding, bias=False)
            for _ in range(num_scales - 1)
        )
        self.conv_up = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=padding, bias=False)
            for _ in range(num_scales - 1)
        )
        self.gain = nn.Parameter(torch.zeros(num_scales))

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``inputs[l]``: ``B×c_in×h_l×w_l`` → ``[B×c_out×h_l×w_l]``."""
        hidden = [F.leaky_relu(conv(x), 0.1) for conv, x in zip(self.conv_in, inputs, strict=True)]
        outputs = []
        for scale in range(self.num_scales):
            out = self.conv_same[scale](hidden[scale])
            if scale > 0:
                out = out + self.conv_down[scale - 1](hidden[scale - 1])
            if scale < self.num_scales - 1:
                coarse = self.conv_up[scale](hidden[scale + 1])
                out = out + F.interpolate(coarse, size=out.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(out * self.gain[scale])
        return outputs


class CrossScaleCoupling(nn.Module):
    """One affine coupling block over all scales (two half-steps, see the module docstring) on ``channels`` ``C`` at
    every scale, with subnets of ``hidden_channels`` and odd ``kernel_size`` and soft clamp ``clamp_alpha``."""

    def __init__(
        self, channels: int, hidden_channels: int, kernel_size: int, clamp_alpha: float, num_scales: int = 3
    ) -> None:
        super().__init__()
        self.split = channels // 2
        rest = channels - self.split
        self.clamp_alpha = clamp_alpha
        self.subnet_a = CrossScaleSubnet(rest, 2 * self.split, hidden_channels, kernel_size, num_scales)
        self.subnet_b = CrossScaleSubnet(self.split, 2 * rest, hidden_channels, kernel_size, num_scales)

    def _couple(
        self, subnet: CrossScaleSubnet, condition: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``targets`` transformed with the coefficients ``subnet(condition)``, and their log|det J| ``B``."""
        outputs, log_det = [], torch.zeros((), device=targets[0].device, dtype=targets[0].dtype)
        for coefficients, target in zip(subnet(condition), targets, strict=True):
            output, log_scale = affine_forward(target, coefficients, self.clamp_alpha, soft_clamp)
            outputs.append(output)
            log_det = log_det + log_scale.flatten(1).sum(dim=1)
        return outputs, log_det

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``inputs[l]``: ``B×C×h_l×w_l`` → (outputs of the same shapes, log|det J| ``B``)."""
        a = [x[:, : self.split] for x in inputs]
        b = [x[:, self.split :] for x in inputs]
        a, log_det_a = self._couple(self.subnet_a, b, a)
        b, log_det_b = self._couple(self.subnet_b, a, b)
        return [torch.cat(pair, dim=1) for pair in zip(a, b, strict=True)], log_det_a + log_det_b

    def inverse(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``inputs`` with ``forward(inputs)[0] == outputs``."""
        a = [y[:, : self.split] for y in outputs]
        b = [y[:, self.split :] for y in outputs]
        b = [affine_inverse(y, coefficients, self.clamp_alpha, soft_clamp)
             for y, coefficients in zip(b, self.subnet_b(a), strict=True)]
        a = [affine_inverse(y, coefficients, self.clamp_alpha, soft_clamp)
             for y, coefficients in zip(a, self.subnet_a(b), strict=True)]
        return [torch.cat(pair, dim=1) for pair in zip(a, b, strict=True)]


class MultiScaleActNorm(nn.Module):
    """Per-scale, per-channel affine ``y = (x + b)·exp(s)`` (Glow's ActNorm), initialised from the first batch.

    ``b = −mean``, ``s = −log std`` per scale and channel of the first training batch: backbone features have scales
    of ~10, too far from ``N(0, 1)`` for a few CPU epochs to learn. Exact log-det ``Σ_l h_l·w_l·Σ_c s_{l,c}``.
    """

    def __init__(self, channels: int, num_scales: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(num_scales, channels))
        self.bias = nn.Parameter(torch.zeros(num_scales, channels))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def initialize(self, inputs: Sequence[torch.Tensor]) -> None:
        """Standardise ``inputs`` (one batch of all scales) per scale and channel."""
        for scale, x in enumerate(inputs):
            values = x.transpose(0, 1).flatten(1).to(self.bias.dtype)
            self.bias[scale].copy_(-values.mean(dim=1))
            self.log_scale[scale].copy_(-values.std(dim=1).clamp_min(1e-6).log())
        self.initialized.fill_(True)

    def _affine(self, scale: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_scale, bias)`` of ``scale`` as ``1×C×1×1`` in ``like``'s dtype."""
        return (self.log_scale[scale].to(like.dtype)[None, :, None, None],
                self.bias[scale].to(like.dtype)[None, :, None, None])

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``inputs[l]``: ``B×C×h_l×w_l`` → (``(x + b)·exp(s)`` of the same shapes, log|det J| ``B``).

        The first call in training mode initialises ``b`` and ``s`` from ``inputs``.
        """
        if self.training and not bool(self.initialized):
            self.initialize(inputs)
        outputs, log_det = [], torch.zeros((), device=inputs[0].device, dtype=inputs[0].dtype)
        for scale, x in enumerate(inputs):
            log_scale, bias = self._affine(scale, x)
            outputs.append((x + bias) * torch.exp(log_scale))
            log_det = log_det + x.shape[-2] * x.shape[-1] * log_scale.sum()
        return outputs, log_det.expand(inputs[0].shape[0])

    def inverse(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``inputs`` with ``forward(inputs)[0] == outputs``."""
        inputs = []
        for scale, y in enumerate(outputs):
            log_scale, bias = self._affine(scale, y)
            inputs.append(y * torch.exp(-log_scale) - bias)
        return inputs


class CrossScaleFlow(nn.Module):
    """CS-Flow: ``coupling_blocks`` × (fixed channel permutation → ``CrossScaleCoupling``).

    ``channels`` ``C`` (≥ 2) at each of ``num_scales`` scales ``S`` (≥ 2); ``kernel_sizes``: one odd subnet kernel
    per block (``None``: the paper's ``[3, …, 3, 5]``); ``hidden_channels``: subnet width (``None``: ``C``); ``seed``:
    of the fixed permutations; ``input_norm``: start with a ``MultiScaleActNorm`` (not in the paper).

    Shapes: ``forward([B×C×h_l×w_l] * S) -> ([B×C×h_l×w_l] * S, log|det J| B)``.
    """

    def __init__(
        self,
        channels: int,
        num_scales: int = 3,
        coupling_blocks: int = 4,
        kernel_sizes: Sequence[int] | None = None,
        hidden_channels: int | None = None,
        clamp_alpha: float = 3.0,
        seed: int = 0,
        input_norm: bool = True,
    ) -> None:
        super().__init__()
        _check_int_at_least(channels=(channels, 2), num_scales=(num_scales, 2), coupling_blocks=(coupling_blocks, 1))
        if kernel_sizes is None:
            kernel_sizes = [3] * (coupling_blocks - 1) + [5]
        kernel_sizes = [int(k) for k in kernel_sizes]
        if len(kernel_sizes) != coupling_blocks or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            msg = (
                f"kernel_sizes={kernel_sizes} must list one odd positive kernel size per coupling block "
                f"(coupling_blocks={coupling_blocks}), e.g. {[3] * (coupling_blocks - 1) + [5]}."
            )
            raise ValueError(msg)
        hidden_channels = channels if hidden_channels is None else int(hidden_channels)
        _check_int_at_least(hidden_channels=(hidden_channels, 1))
        if not clamp_alpha > 0:
            msg = f"clamp_alpha must be positive, got {clamp_alpha}."
            raise ValueError(msg)
        self.channels = channels
        self.num_scales = num_scales
        self.kernel_sizes = kernel_sizes
        self.hidden_channels = hidden_channels
        generator = torch.Generator().manual_seed(seed)
        permutations = torch.stack([torch.randperm(channels, generator=generator) for _ in range(coupling_blocks)])
        self.register_buffer("permutations", permutations)
        self.register_buffer("inverse_permutations", permutations.argsort(dim=1))
        self.input_norm = MultiScaleActNorm(channels, num_scales) if input_norm else None
        self.blocks = nn.ModuleList(
            CrossScaleCoupling(channels, hidden_channels, kernel, clamp_alpha, num_scales) for kernel in kernel_sizes
        )

    def _check_inputs(self, inputs: Sequence[torch.Tensor]) -> None:
        if len(inputs) != self.num_scales or any(x.ndim != 4 or x.shape[1] != self.channels for x in inputs):
            shapes = [tuple(x.shape) for x in inputs]
            msg = f"Expected {self.num_scales} maps B×{self.channels}×h×w (fine to coarse), got shapes {shapes}."
            raise ValueError(msg)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features ``[B×C×h_l×w_l]`` (fine to coarse) → ``(latents`` of the same shapes, ``log|det J|`` ``B)``."""
        self._check_inputs(inputs)
        values = list(inputs)
        log_det = torch.zeros(values[0].shape[0], device=values[0].device, dtype=values[0].dtype)
        if self.input_norm is not None:
            values, log_det = self.input_norm(values)
        for permutation, block in zip(self.permutations, self.blocks, strict=True):
            values, block_log_det = block([x[:, permutation] for x in values])
            log_det = log_det + block_log_det
        return values, log_det

    def inverse(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Features ``[B×C×h_l×w_l]`` whose latents are ``latents``."""
        self._check_inputs(latents)
        values = list(latents)
        for inverse, block in zip(reversed(self.inverse_permutations), reversed(self.blocks), strict=True):
            values = [x[:, inverse] for x in block.inverse(values)]
        if self.input_norm is not None:
            values = self.input_norm.inverse(values)
        return values


def _check_int_at_least(**values: tuple[int, int]) -> None:
    for name, (value, minimum) in values.items():
        if int(value) != value or value < minimum:
            msg = f"{name} must be an integer ≥ {minimum}, got {value}."
            raise ValueError(msg)
