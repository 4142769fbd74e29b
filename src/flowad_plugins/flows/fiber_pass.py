"""CFLOW-AD's fast path through a conditional ``fiber_flow``: the positional condition projected once per position.

A subnet's first layer ``W·[x₁; c] + b = W_x·x₁ + (W_c·c + b)`` repeats ``W_c·c + b`` for every image at a position.
``fold_conditional_flow`` prepares each block for a ``T×P`` condition table: ``W_c·c + b`` once per row, the
``COEFFICIENT_SCALE`` folded into the last subnet layer and the global affine into the mixing matrix.
``fiber_flow_forward`` runs fibers ``N×C``; ``map_flow_forward`` runs maps ``B×C×h×w`` as 1×1 convolutions with the
condition term as a per-position bias. Both equal ``flow(fibers, condition)``. The clamp is evaluated as ``Tanh``
here (faster in OpenVINO on CFLOW's steps: ``benchmarks/results/openvino_profile.md``; equal in eager mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from flowad_plugins.flows.affine import affine_forward, tanh_clamp
from flowad_plugins.flows.affine_coupling import COEFFICIENT_SCALE, AffineCouplingBlock, CouplingFlow


@dataclass
class FiberStep:
    """One ``AffineCouplingBlock`` prepared for a condition table (tensors keep autograd).

    ``condition_term`` (``T×hidden``) is ``W_c·c + b`` of the subnet's first layer per table row; ``input_weight``
    (``hidden×C₁``) its ``x₁`` part; ``middle`` the subnet's layers between first and last; ``output_weight`` /
    ``output_bias`` the last layer times ``COEFFICIENT_SCALE``; ``mixing_weight`` (``C×C``) / ``mixing_bias`` the
    global affine and channel mixing as one linear map; ``log_det_constant`` the global affine's ``Σ log g``.
    """

    splits: tuple[int, int]
    clamp: float
    input_weight: torch.Tensor
    condition_term: torch.Tensor
    middle: list[nn.Module]
    output_weight: torch.Tensor
    output_bias: torch.Tensor
    mixing_weight: torch.Tensor
    mixing_bias: torch.Tensor
    log_det_constant: torch.Tensor

    def coupling(self, x: torch.Tensor, hidden: torch.Tensor, product: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Finish the step on ``x`` from the first layer's output ``hidden`` → ``(y, log-det per position)``."""
        for layer in self.middle:
            hidden = layer(hidden)
        coefficients = _product(hidden, self.output_weight, self.output_bias, product)
        x1, x2 = torch.split(x, self.splits, dim=1)
        x2, log_scale = affine_forward(x2, coefficients, self.clamp, tanh_clamp)
        y = _product(torch.cat((x1, x2), dim=1), self.mixing_weight, self.mixing_bias, product)
        return y, log_scale.sum(dim=1) + self.log_det_constant


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, product: str) -> torch.Tensor:
    """``weight`` (``out×in``) along axis 1: ``F.linear`` on fibers, a 1×1 convolution on maps."""
    if product == "linear":
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight[:, :, None, None], bias)


def _check_block(block: nn.Module) -> AffineCouplingBlock:
    if not isinstance(block, AffineCouplingBlock) or block.condition_channels == 0:
        msg = f"The fiber pass needs conditional AffineCouplingBlocks (fiber_flow), got {type(block).__name__}."
        raise TypeError(msg)
    layers = list(block.subnet) if isinstance(block.subnet, nn.Sequential) else []
    if len(layers) < 2 or not isinstance(layers[0], nn.Linear) or not isinstance(layers[-1], nn.Linear):
        msg = "The fiber pass needs subnets that start and end with nn.Linear (as built by linear_subnet)."
        raise ValueError(msg)
    return block


def fold_conditional_flow(flow: CouplingFlow, condition_table: torch.Tensor) -> list[FiberStep]:
    """The blocks of ``flow`` prepared for a ``T×P`` condition table (cheap, differentiable; cache it at inference)."""
    steps = []
    for module in flow.module_list:
        block = _check_block(module)
        first, *middle, last = block.subnet
        split = block.splits[0]
        bias = last.bias if last.bias is not None else last.weight.new_zeros(last.weight.shape[0])
        mixing_weight, mixing_bias = block.mixing_affine()
        steps.append(FiberStep(
            splits=block.splits, clamp=block.clamp, input_weight=first.weight[:, :split].contiguous(),
            condition_term=F.linear(condition_table, first.weight[:, split:], first.bias), middle=list(middle),
            output_weight=COEFFICIENT_SCALE * last.weight, output_bias=COEFFICIENT_SCALE * bias,
            mixing_weight=mixing_weight, mixing_bias=mixing_bias, log_det_constant=block.log_det_constant(),
        ))
    return steps


def fiber_flow_forward(
    flow: CouplingFlow,
    fibers: torch.Tensor,
    condition_table: torch.Tensor,
    condition_index: torch.Tensor | None = None,
    steps: list[FiberStep] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a conditional ``fiber_flow`` on fibers ``N×C`` whose conditions are rows of a ``T×P`` table.

    ``condition_index`` (``N``, long) gives each fiber's table row; ``None`` when the fibers are whole maps in table
    order (``N = B·T``, fiber ``b·T + t`` uses row ``t``): the condition term is then broadcast, not gathered.
    ``steps``: ``fold_conditional_flow(flow, condition_table)`` if already computed. Returns ``(z N×C, log|det J| N)``
    equal to ``flow(fibers, condition_table[condition_index])``.
    """
    rows = condition_table.shape[0]
    if condition_index is None and fibers.shape[0] % rows:
        msg = f"Without condition_index, fibers ({fibers.shape[0]}) must be whole maps of {rows} positions."
        raise ValueError(msg)
    if steps is None:
        steps = fold_conditional_flow(flow, condition_table)
    x, log_det = fibers, None
    for step in steps:
        x1 = x[:, : step.splits[0]]
        if condition_index is None:
            hidden = F.linear(x1, step.input_weight)  # the linear's own output: safe to update in place
            hidden.view(-1, rows, hidden.shape[1]).add_(step.condition_term)
        else:
            hidden = F.linear(x1, step.input_weight) + step.condition_term[condition_index]
        x, step_log_det = step.coupling(x, hidden, "linear")
        log_det = step_log_det if log_det is None else log_det + step_log_det
    return x, log_det


def map_flow_forward(steps: list[FiberStep], maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run prepared ``steps`` on whole maps ``B×C×h×w`` (condition table of ``T = h·w`` rows in row-major order).

    Every product is a 1×1 convolution and the condition term a ``1×hidden×h×w`` bias. Returns
    ``(z B×C×h×w, log|det J| B×h×w)``.
    """
    _, _, height, width = maps.shape
    x, log_det = maps, None
    for step in steps:
        bias_map = step.condition_term.t().reshape(1, -1, height, width)
        hidden = F.conv2d(x[:, : step.splits[0]], step.input_weight[:, :, None, None]) + bias_map
        x, step_log_det = step.coupling(x, hidden, "conv")
        log_det = step_log_det if log_det is None else log_det + step_log_det
    return x, log_det
