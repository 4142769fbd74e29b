"""Forward pass of a conditional ``fiber_flow`` that projects the condition once per position.

In CFLOW-AD the condition of a fiber is the positional encoding of its position, so the subnet's first
layer ``W·[x₁; c] + b = W_x·x₁ + (W_c·c + b)`` repeats the same ``W_c·c + b`` for every image at a
position. ``fiber_flow_forward`` evaluates the same FrEIA ``AllInOneBlock`` parameters (same maths:
affine coupling with the 0.1 pre-scale and ``clamp·tanh`` clamp, global affine, permutation) but
computes ``W_c·c + b`` once per distinct condition row (``T×hidden``) and gathers it per fiber (or
broadcasts it, for whole maps). ``fiber_flow_steps`` also folds the FrEIA 0.1 pre-scale and the global
affine into the weights, so a block is two matmuls, the coupling and the mixing matmul. For a
40-channel layer with a 128-d condition this removes about two thirds of the flow's multiply-adds.
The inverse stays FrEIA's ``flow(z, c=[c], rev=True)``; tests check both passes agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn
from torch.nn import functional as F

from flowad_plugins.flows.coupling import coupling_log_scale
from flowad_plugins.tracing import is_exporting


def _check_block(block: nn.Module) -> AllInOneBlock:
    """Refuse blocks whose options this pass does not reproduce."""
    if not isinstance(block, AllInOneBlock):
        msg = f"fiber_flow_forward supports AllInOneBlock steps only, got {type(block).__name__}."
        raise TypeError(msg)
    if block.GIN or block.householder or block.reverse_pre_permute or not block.conditional or block.input_rank != 0:
        msg = (
            "fiber_flow_forward supports conditional 1D AllInOneBlocks without GIN, Householder or reverse permutation."
        )
        raise ValueError(msg)
    if not isinstance(block.subnet, nn.Sequential) or not isinstance(block.subnet[0], nn.Linear):
        msg = "fiber_flow_forward needs subnets that start with nn.Linear (as built by linear_subnet)."
        raise ValueError(msg)
    return block


@dataclass
class FiberStep:
    """One ``AllInOneBlock`` of a ``fiber_flow`` in the form ``fiber_flow_forward`` evaluates.

    ``condition_term`` (``T×hidden``) is ``W_c·c + b`` of the subnet's first layer per condition-table row;
    ``input_weight`` (``hidden×C₁``) its ``x₁`` part. The FrEIA 0.1 pre-scale is folded into the last subnet
    layer (``output_weight``/``output_bias``, or applied after ``output_layer`` when that is not linear), the
    global affine into the permutation (``mixing_weight`` ``C×C``, ``mixing_bias`` ``C``); ``log_det_constant``
    is the global affine's ``Σ log g``. Built by ``fiber_flow_steps`` with autograd intact.
    """

    splits: tuple[int, int]
    clamp: float
    input_weight: torch.Tensor
    condition_term: torch.Tensor
    middle: list[nn.Module]
    output_layer: nn.Module
    output_weight: torch.Tensor | None
    output_bias: torch.Tensor | None
    mixing_weight: torch.Tensor
    mixing_bias: torch.Tensor
    log_det_constant: torch.Tensor


def fiber_flow_steps(flow: SequenceINN, condition_table: torch.Tensor) -> list[FiberStep]:
    """The blocks of ``flow`` prepared for ``fiber_flow_forward`` with a ``T×P`` condition table.

    Cheap (no per-fiber work), differentiable; cache the result at inference while the parameters do not change.
    """
    steps = []
    for module in flow.module_list:
        block = _check_block(module)
        first, *middle, last = block.subnet
        global_scale = block.global_scale_activation(block.global_scale)  # 1×C
        linear_output = isinstance(last, nn.Linear)
        steps.append(
            FiberStep(
                splits=tuple(block.splits),
                clamp=float(block.clamp),
                input_weight=first.weight[:, : block.splits[0]].contiguous(),
                condition_term=F.linear(condition_table, first.weight[:, block.splits[0] :], first.bias),
                middle=list(middle),
                output_layer=last,
                output_weight=last.weight * 0.1 if linear_output else None,
                output_bias=last.bias * 0.1 if linear_output and last.bias is not None else None,
                # global affine then permutation as one linear map: (y·g + o)·Pᵀ = y·(P·diag g)ᵀ + o·Pᵀ
                mixing_weight=block.w_perm * global_scale,
                mixing_bias=F.linear(block.global_offset, block.w_perm).reshape(-1),
                log_det_constant=torch.log(global_scale).sum(),
            )
        )
    return steps


def fiber_flow_forward(
    flow: SequenceINN,
    fibers: torch.Tensor,
    condition_table: torch.Tensor,
    condition_index: torch.Tensor | None = None,
    steps: list[FiberStep] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a conditional ``fiber_flow`` on fibers ``N×C`` whose conditions are rows of a table.

    Args:
        flow: stack built by ``fiber_flow(..., condition_dim=P)``.
        fibers: ``N×C``.
        condition_table: ``T×P`` distinct condition vectors (e.g. one per feature-map position).
        condition_index: ``N`` (long), the table row of each fiber's condition. ``None`` when the fibers
            are whole maps in table order (``N = B·T``, fiber ``b·T + t`` uses row ``t``): the condition
            term is then broadcast over the batch instead of gathered per fiber.
        steps: ``fiber_flow_steps(flow, condition_table)`` if already computed (inference cache).

    Returns:
        ``(z N×C, log|det J| N)``, equal to ``flow(fibers, c=[condition_table[condition_index]])``.
    """
    rows = condition_table.shape[0]
    if condition_index is None and fibers.shape[0] % rows:
        msg = f"Without condition_index, fibers ({fibers.shape[0]}) must be whole maps of {rows} positions."
        raise ValueError(msg)
    if steps is None:
        steps = fiber_flow_steps(flow, condition_table)
    single_map = condition_index is None and not is_exporting() and fibers.shape[0] == rows
    x = fibers
    log_det = fibers.new_zeros(fibers.shape[0])
    for step in steps:
        x1, x2 = torch.split(x, step.splits, dim=1)
        if single_map:  # one map (eager only: keeps an exported batch dynamic): the condition term is the bias
            hidden = torch.addmm(step.condition_term, x1, step.input_weight.t())
        elif condition_index is None:
            hidden = F.linear(x1, step.input_weight)  # the linear's own output: safe to update in place
            hidden.view(-1, rows, hidden.shape[1]).add_(step.condition_term)
        else:
            hidden = F.linear(x1, step.input_weight)
            hidden = hidden + step.condition_term[condition_index]
        for index, layer in enumerate(step.middle):
            # the first layer's output is fresh and not saved by autograd: a ReLU right after it may overwrite it
            in_place = index == 0 and isinstance(layer, nn.ReLU)
            hidden = F.relu(hidden, inplace=True) if in_place else layer(hidden)
        if step.output_weight is not None:
            coefficients = F.linear(hidden, step.output_weight, step.output_bias)
        else:
            coefficients = step.output_layer(hidden) * 0.1
        passive = step.splits[1]
        log_scale = coupling_log_scale(coefficients[:, :passive], step.clamp)
        x2 = torch.addcmul(coefficients[:, passive:], x2, torch.exp(log_scale))
        x = F.linear(torch.cat((x1, x2), dim=1), step.mixing_weight, step.mixing_bias)
        log_det = log_det + (log_scale.sum(dim=1) + step.log_det_constant)
    return x, log_det
