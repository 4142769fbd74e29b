"""Subnets and the two coupling-flow stacks built from ``AffineCouplingBlock``: fibers (CFLOW-AD) and maps (FastFlow).

A subnet constructor is ``(c_in, c_out) -> nn.Module``; a stack is a ``CouplingFlow`` returning
``(z, log|det J| per position)`` from ``flow(x, condition)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flowad_plugins.flows.affine_coupling import AffineCouplingBlock, CouplingFlow, SubnetConstructor


def linear_subnet(hidden_ratio: float = 2.0) -> SubnetConstructor:
    """Fully connected subnet ``Linear → ReLU → Linear`` with ``hidden = hidden_ratio·c_in`` (fibers ``N×C``)."""
    return _LinearSubnet(hidden_ratio)


def conv_subnet(kernel_size: int, hidden_ratio: float = 1.0) -> SubnetConstructor:
    """Fully convolutional subnet ``Conv k×k → ReLU → Conv k×k`` (same padding) on ``B×C×H×W``."""
    return _ConvSubnet(kernel_size, hidden_ratio)


class _LinearSubnet:
    """Picklable constructor of ``linear_subnet``."""

    def __init__(self, hidden_ratio: float) -> None:
        self.hidden_ratio = hidden_ratio

    def __call__(self, c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(self.hidden_ratio * c_in))
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))


class _ConvSubnet:
    """Picklable constructor of ``conv_subnet``."""

    def __init__(self, kernel_size: int, hidden_ratio: float) -> None:
        self.kernel_size, self.hidden_ratio = kernel_size, hidden_ratio

    def __call__(self, c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(self.hidden_ratio * c_in))
        padding = self.kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, self.kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, self.kernel_size, padding=padding),
        )


def fiber_flow(
    n_features: int,
    coupling_blocks: int,
    clamp_alpha: float,
    condition_dim: int = 0,
    permute_soft: bool = True,
    hidden_ratio: float = 2.0,
) -> CouplingFlow:
    """Stack of ``coupling_blocks`` blocks on fibers ``N×n_features``, optionally conditioned on ``N×condition_dim``
    (CFLOW-AD's positional encoding). ``flow(x, condition) -> (z N×C, log|det J| N)``."""
    _check_positive(n_features=n_features, coupling_blocks=coupling_blocks, clamp_alpha=clamp_alpha)
    if n_features < 2:
        msg = f"A coupling flow needs at least 2 feature channels, got n_features={n_features}."
        raise ValueError(msg)
    subnet = linear_subnet(hidden_ratio)
    return CouplingFlow([
        AffineCouplingBlock(n_features, subnet, clamp_alpha, spatial_dims=0, condition_channels=condition_dim,
                            permute_soft=permute_soft)
        for _ in range(coupling_blocks)
    ])


def conv_flow(
    input_shape: Sequence[int],
    flow_steps: int,
    clamp_alpha: float,
    kernel_sizes: Sequence[int],
    hidden_ratio: float = 1.0,
    permute_soft: bool = False,
) -> CouplingFlow:
    """Stack of ``flow_steps`` blocks on ``B×C×H×W`` maps; step ``i`` uses ``kernel_sizes[i % len]``.

    ``input_shape`` is ``(C, H, W)`` (only ``C`` shapes the flow). ``flow(x) -> (z B×C×H×W, log|det J| B×H×W)``.
    """
    channels = int(input_shape[0])
    _check_positive(flow_steps=flow_steps, clamp_alpha=clamp_alpha, hidden_ratio=hidden_ratio)
    return CouplingFlow([
        AffineCouplingBlock(channels, conv_subnet(kernel_sizes[step % len(kernel_sizes)], hidden_ratio), clamp_alpha,
                            spatial_dims=2, permute_soft=permute_soft)
        for step in range(flow_steps)
    ])


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            msg = f"{name} must be positive, got {value}."
            raise ValueError(msg)
