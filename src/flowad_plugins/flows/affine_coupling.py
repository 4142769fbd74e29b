"""The affine coupling block of CFLOW-AD and FastFlow, and the stack of them: forward, inverse, log-det per position.

One block (the "all-in-one" form of Glow-style flows, parameterised as FrEIA 0.2's ``AllInOneBlock`` with a
softplus global affine, so checkpoints written with FrEIA load unchanged) maps ``x`` (``N×C`` fibers or
``B×C×h×w`` maps; the channel axis is 1) to ``y``:

    x₁, x₂ = split(x)                         (⌈C/2⌉, ⌊C/2⌋ channels)
    (a_s, a_t) = 0.1 · subnet([x₁; condition])
    s = α·tanh(a_s)                           (clamped log-scale, |s| < α)
    x₂ ← x₂ · eˢ + a_t
    y = P · (g ⊙ [x₁; x₂] + o)                (global affine g = 0.1·softplus_{β=½}(γ) > 0, offset o,
                                               fixed channel mixing P: a permutation or a rotation)

Each position's channels are scaled by their own factors, so ``log|det J|`` is a sum of per-position terms
``Σ_c s_c + Σ_c log g_c`` (P is orthogonal): ``forward`` returns it per position (``N`` or ``B×h×w``); its sum over
positions is the whole Jacobian's. ``inverse`` undoes ``forward`` exactly.

Fast paths, all the same function: the 0.1 damping is folded into the subnet's last layer; a hard permutation is
a channel gather in eager mode (exported graphs: one product with the global affine folded in); ``α·tanh`` is
evaluated as ``α·(2σ(2a) − 1)`` (faster on CPU, in PyTorch and, for maps, in OpenVINO; see ``clamped_log_scale``).
Nothing holds a lambda, so a whole model pickles (``torch.save(model)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import special_ortho_group
from torch import nn
from torch.nn import functional as F

from flowad_plugins.tracing import is_exporting

SubnetConstructor = Callable[[int, int], nn.Module]

COEFFICIENT_SCALE = 0.1  # damping of the subnet output (stable start: every block begins near the identity)
# pre-activation of the global scale such that 0.1·softplus_{β=½}(γ) = 1 at initialisation
GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(5.0) - 1.0)


def clamped_log_scale(raw: torch.Tensor, clamp: float, tanh_when_exporting: bool = False) -> torch.Tensor:
    """The coupling log-scale ``clamp·tanh(raw)`` (any shape, elementwise).

    Evaluated as ``clamp·(2σ(2·raw) − 1)``, the same function to float32 rounding: faster in eager PyTorch on CPU and,
    in OpenVINO, faster on FastFlow's maps. ``tanh_when_exporting`` keeps ``Tanh`` in exported graphs instead, which
    OpenVINO runs faster on CFLOW's fibers (per-op profiles: ``benchmarks/results/openvino_profile.md``).
    """
    if tanh_when_exporting and is_exporting():
        return clamp * torch.tanh(raw)
    return torch.sigmoid(2.0 * raw) * (2.0 * clamp) - clamp


def _mixing_matrix(channels: int, soft: bool) -> np.ndarray:
    """``C×C`` channel mixing: a random rotation (``soft``) or a random permutation matrix (NumPy's global RNG)."""
    if soft:
        return special_ortho_group.rvs(channels)
    matrix = np.zeros((channels, channels))
    for row, column in enumerate(np.random.permutation(channels)):
        matrix[row, column] = 1.0
    return matrix


def _refresh_channel_order(block: AffineCouplingBlock, incompatible_keys: object) -> None:
    """State-dict post-hook (a module-level function, so the model still pickles)."""
    del incompatible_keys
    block._update_channel_order()


class AffineCouplingBlock(nn.Module):
    """One affine coupling step with global affine and fixed channel mixing (see the module docstring).

    Args:
        channels: ``C`` (≥ 2).
        subnet_constructor: ``(c_in, c_out) -> nn.Module`` mapping ``⌈C/2⌉ + condition_channels`` channels to
            ``2·⌊C/2⌋`` (axis 1).
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
        self.register_buffer("channel_order", torch.zeros(channels, dtype=torch.long), persistent=False)
        self.hard_permutation = False
        self._update_channel_order()
        self.register_load_state_dict_post_hook(_refresh_channel_order)

    @torch.no_grad()
    def _update_channel_order(self) -> None:
        """``out[i] = in[channel_order[i]]`` when ``P`` is a permutation matrix (checked on the actual weights)."""
        matrix = self.w_perm.detach().reshape(self.channels, self.channels)
        order = matrix.argmax(dim=1)
        self.hard_permutation = bool(torch.equal(matrix, F.one_hot(order, self.channels).to(matrix.dtype)))
        self.channel_order = order.to(self.channel_order.device)

    def global_scale_factor(self) -> torch.Tensor:
        """``g = 0.1·softplus_{β=½}(γ)``, shape ``1×C(×1×1)``."""
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _channel_product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (``C_out×C_in(×1×1)``) applied along axis 1 of fibers or maps."""
        if self.spatial_dims == 0:
            return F.linear(x, weight.reshape(weight.shape[0], -1), bias)
        return F.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias)

    def coupling_coefficients(self, subnet_input: torch.Tensor) -> torch.Tensor:
        """``0.1·subnet(input)``, the damping folded into the last layer when it is a Linear/Conv with bias."""
        layers = list(self.subnet) if isinstance(self.subnet, nn.Sequential) else []
        last = layers[-1] if layers else None
        foldable = isinstance(last, nn.Linear | nn.Conv2d) and last.bias is not None
        if not foldable or (isinstance(last, nn.Conv2d) and last.padding_mode != "zeros"):
            return self.subnet(subnet_input) * COEFFICIENT_SCALE
        hidden = subnet_input
        for index, layer in enumerate(layers[:-1]):
            # the first layer's output is fresh and not saved by autograd: a ReLU right after it may overwrite it
            in_place = index == 1 and isinstance(layer, nn.ReLU)
            hidden = F.relu(hidden, inplace=True) if in_place else layer(hidden)
        weight, bias = COEFFICIENT_SCALE * last.weight, COEFFICIENT_SCALE * last.bias
        if isinstance(last, nn.Linear):
            return F.linear(hidden, weight, bias)
        return F.conv2d(hidden, weight, bias, last.stride, last.padding, last.dilation, last.groups)

    def _subnet_input(self, x1: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        if (condition is None) != (self.condition_channels == 0):
            msg = (f"This block was built with condition_channels={self.condition_channels}; "
                   f"got condition={'None' if condition is None else tuple(condition.shape)}.")
            raise ValueError(msg)
        return x1 if condition is None else torch.cat((x1, condition), dim=1)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``P·(g ⊙ x + o)`` along axis 1.

        Eager, hard permutation: a channel gather and one fused multiply-add. Otherwise (a rotation, or any
        exported graph) one product with the global affine folded in, ``(P·diag g)·x + P·o``: in OpenVINO a 1×1
        convolution / GEMM keeps the blocked layout, where a gather forces layout reorders around it.
        """
        scale = self.global_scale_factor()
        if self.hard_permutation and not is_exporting():
            order = self.channel_order
            return torch.addcmul(self.global_offset[:, order], x.index_select(1, order), scale[:, order])
        matrix = self.w_perm.reshape(self.channels, self.channels)
        bias = torch.matmul(matrix, self.global_offset.reshape(-1))
        return self._channel_product(x, matrix * scale.reshape(1, -1), bias)

    def unmix(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of ``mix``."""
        return (self._channel_product(y, self.w_perm_inv) - self.global_offset) / self.global_scale_factor()

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None, with_log_det: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (``N×C`` or ``B×C×h×w``) → ``(y, log|det J| per position N or B×h×w)`` (``None`` without log-det)."""
        x1, x2 = torch.split(x, self.splits, dim=1)
        coefficients = self.coupling_coefficients(self._subnet_input(x1, condition))
        passive = self.splits[1]
        log_scale = clamped_log_scale(coefficients[:, :passive], self.clamp)
        x2 = torch.addcmul(coefficients[:, passive:], x2, torch.exp(log_scale))  # x₂·eˢ + t
        y = self.mix(torch.cat((x1, x2), dim=1))
        if not with_log_det:
            return y, None
        return y, log_scale.sum(dim=1) + torch.log(self.global_scale_factor()).sum()

    def inverse(self, y: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with ``forward(x, condition)[0] == y``."""
        x1, x2 = torch.split(self.unmix(y), self.splits, dim=1)
        coefficients = self.coupling_coefficients(self._subnet_input(x1, condition))
        passive = self.splits[1]
        log_scale = clamped_log_scale(coefficients[:, :passive], self.clamp)
        return torch.cat((x1, (x2 - coefficients[:, passive:]) * torch.exp(-log_scale)), dim=1)


class CouplingFlow(nn.Module):
    """A stack of ``AffineCouplingBlock``; state-dict keys ``module_list.<i>.…`` (as FrEIA's ``SequenceINN``)."""

    def __init__(self, blocks: Sequence[AffineCouplingBlock]) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(blocks)

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None, with_log_det: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` → ``(z, log|det J| per position)``; the same condition enters every block."""
        log_det = None
        for block in self.module_list:
            x, step_log_det = block(x, condition, with_log_det)
            if step_log_det is not None:
                log_det = step_log_det if log_det is None else log_det + step_log_det
        return x, log_det

    def inverse(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with ``forward(x, condition)[0] == z``."""
        for block in reversed(self.module_list):
            z = block.inverse(z, condition)
        return z
