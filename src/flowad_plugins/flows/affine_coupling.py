"""The affine coupling block of CFLOW-AD and FastFlow, and the stack of them: forward, inverse, log-det per position.

One block (FrEIA 0.2's ``AllInOneBlock`` with a softplus global affine, so FrEIA checkpoints load unchanged) maps
``x`` (``N×C`` fibers or ``B×C×h×w`` maps; channel axis 1) to ``y``:

    x₁, x₂ = split(x)                         (⌈C/2⌉, ⌊C/2⌋ channels)
    (a, t) = COEFFICIENT_SCALE · subnet([x₁; condition])
    x₂ ← x₂ · exp(α·tanh(a)) + t              (``flows.affine``)
    y = P · (g ⊙ [x₁; x₂] + o)                (g = GLOBAL_SCALE_FACTOR·softplus_{β=½}(γ) > 0, offset o,
                                               fixed channel mixing P: a permutation or a rotation)

``log|det J|`` per position is ``Σ_c α·tanh(a_c) + Σ_c log g_c`` (P is orthogonal). The mixing is one product with
the global affine folded in, ``(P·diag g)·x + P·o``: a permutation as a gather was not faster in eager mode
(``benchmarks/results/flow_forms.md``) and forces layout reorders in OpenVINO. Nothing holds a lambda, so a whole
model pickles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import special_ortho_group
from torch import nn
from torch.nn import functional as F

from flowad_plugins.flows.affine import affine_forward, affine_inverse, tanh_clamp_via_sigmoid

SubnetConstructor = Callable[[int, int], nn.Module]

# FrEIA's AllInOneBlock multiplies the subnet output by 0.1: every block starts near the identity
COEFFICIENT_SCALE = 0.1
# FrEIA's softplus global affine: g = 0.1·softplus_{β=½}(γ)
GLOBAL_SCALE_FACTOR = 0.1
# pre-activation of the global scale such that GLOBAL_SCALE_FACTOR·softplus_{β=½}(γ) = 1 at initialisation
GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(0.5 / GLOBAL_SCALE_FACTOR) - 1.0)


def _mixing_matrix(channels: int, soft: bool) -> np.ndarray:
    """``C×C`` channel mixing: a random rotation (``soft``) or a random permutation matrix (NumPy's global RNG)."""
    if soft:
        return special_ortho_group.rvs(channels)
    matrix = np.zeros((channels, channels))
    for row, column in enumerate(np.random.permutation(channels)):
        matrix[row, column] = 1.0
    return matrix


class AffineCouplingBlock(nn.Module):
    """One affine coupling step with global affine and fixed channel mixing (see the module docstring).

    Args:
        channels: ``C`` (≥ 2).
        subnet_constructor: ``(c_in, c_out) -> nn.Module``, ``⌈C/2⌉ + condition_channels`` → ``2·⌊C/2⌋`` channels.
        clamp: ``α``, bound of the log-scale.
        spatial_dims: 0 for fibers ``N×C``, 2 for maps ``B×C×h×w``.
        condition_channels: channels of the condition concatenated to ``x₁`` (0 = unconditional).
        permute_soft: random rotation (True) or random permutation (False) as ``P``.
    """

    def __init__(
        self,
        channels: int,
        subnet_constructor: SubnetConstructor,
        clamp: float,
        spatial_dims: int = 0,
        condition_channels: int = 0,
        permute_soft: bool = False,
    ) -> None:
        super().__init__()
        if channels < 2:
            msg = f"A coupling block needs at least 2 channels, got channels={channels}."
            raise ValueError(msg)
        if spatial_dims not in (0, 2):
            msg = f"spatial_dims must be 0 (fibers N×C) or 2 (maps B×C×h×w), got {spatial_dims}."
            raise ValueError(msg)
        self.channels = channels
        self.splits = (channels - channels // 2, channels // 2)
        self.clamp = float(clamp)
        self.spatial_dims = spatial_dims
        self.condition_channels = condition_channels
        self.permute_soft = permute_soft
        shape = (1, channels, *([1] * spatial_dims))
        self.global_scale = nn.Parameter(torch.full(shape, GLOBAL_SCALE_INIT))
        self.global_offset = nn.Parameter(torch.zeros(shape))
        matrix = _mixing_matrix(channels, permute_soft)
        kernel = (channels, channels, *([1] * spatial_dims))
        self.w_perm = nn.Parameter(torch.tensor(matrix, dtype=torch.float32).view(kernel), requires_grad=False)
        self.w_perm_inv = nn.Parameter(torch.tensor(matrix.T, dtype=torch.float32).view(kernel), requires_grad=False)
        self.subnet = subnet_constructor(self.splits[0] + condition_channels, 2 * self.splits[1])

    def global_scale_factor(self) -> torch.Tensor:
        """``g = GLOBAL_SCALE_FACTOR·softplus_{β=½}(γ)``, shape ``1×C(×1×1)``."""
        return GLOBAL_SCALE_FACTOR * F.softplus(self.global_scale, beta=0.5)

    def log_det_constant(self) -> torch.Tensor:
        """The global affine's share of ``log|det J|`` per position, ``Σ_c log g_c`` (a scalar)."""
        return torch.log(self.global_scale_factor()).sum()

    def mixing_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global affine and mixing as one linear map along axis 1: weight ``P·diag g`` (``C×C``), bias ``P·o``."""
        matrix = self.w_perm.reshape(self.channels, self.channels)
        weight = matrix * self.global_scale_factor().reshape(1, -1)
        return weight, torch.matmul(matrix, self.global_offset.reshape(-1))

    def _channel_product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (``C_out×C_in(×1×1)``) applied along axis 1 of fibers or maps."""
        if self.spatial_dims == 0:
            return F.linear(x, weight.reshape(weight.shape[0], -1), bias)
        return F.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias)

    def coupling_coefficients(self, x1: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """``[a; t] = COEFFICIENT_SCALE·subnet([x₁; condition])`` (``2·⌊C/2⌋`` channels on axis 1)."""
        if (condition is None) != (self.condition_channels == 0):
            msg = (f"This block was built with condition_channels={self.condition_channels}; "
                   f"got condition={'None' if condition is None else tuple(condition.shape)}.")
            raise ValueError(msg)
        subnet_input = x1 if condition is None else torch.cat((x1, condition), dim=1)
        return self.subnet(subnet_input) * COEFFICIENT_SCALE

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (``N×C`` or ``B×C×h×w``), condition (``N×P`` / ``B×P×h×w``, or ``None``) → ``(y`` shaped as ``x``,
        ``log|det J|`` per position ``N`` or ``B×h×w)``."""
        x1, x2 = torch.split(x, self.splits, dim=1)
        x2, log_scale = affine_forward(x2, self.coupling_coefficients(x1, condition), self.clamp,
                                       tanh_clamp_via_sigmoid)
        weight, bias = self.mixing_affine()
        y = self._channel_product(torch.cat((x1, x2), dim=1), weight, bias)
        return y, log_scale.sum(dim=1) + self.log_det_constant()

    def inverse(self, y: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with ``forward(x, condition)[0] == y``."""
        unmixed = (self._channel_product(y, self.w_perm_inv) - self.global_offset) / self.global_scale_factor()
        x1, x2 = torch.split(unmixed, self.splits, dim=1)
        x2 = affine_inverse(x2, self.coupling_coefficients(x1, condition), self.clamp, tanh_clamp_via_sigmoid)
        return torch.cat((x1, x2), dim=1)


class CouplingFlow(nn.Module):
    """A stack of ``AffineCouplingBlock``; state-dict keys ``module_list.<i>.…`` (as FrEIA's ``SequenceINN``)."""

    def __init__(self, blocks: Sequence[AffineCouplingBlock]) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (``N×C`` or ``B×C×h×w``) → ``(z`` of the same shape, ``log|det J|`` per position ``N`` or ``B×h×w)``;
        the same condition enters every block."""
        log_det = None
        for block in self.module_list:
            x, block_log_det = block(x, condition)
            log_det = block_log_det if log_det is None else log_det + block_log_det
        return x, log_det

    def inverse(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with ``forward(x, condition)[0] == z``."""
        for block in reversed(self.module_list):
            z = block.inverse(z, condition)
        return z
